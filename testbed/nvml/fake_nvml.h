/*
 * Shared declarations of the testbed's fake NVML (fake_nvml.c: entry points and the documentation
 * of state keys and report layout; state.c: the state file; evidence.c: attestation reports).
 * The types and constants below are nvml.h facts: names, values and layouts as the real
 * library has them.
 */

#ifndef CONFINFER_TESTBED_FAKE_NVML_H
#define CONFINFER_TESTBED_FAKE_NVML_H

#include <limits.h>
#include <stddef.h>

/* ---- nvml.h facts ---------------------------------------------------------------------- */

typedef int nvmlReturn_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NO_PERMISSION 4
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_GPU_NOT_FOUND 28
#define NVML_ERROR_UNKNOWN 999

#define NVML_INIT_FLAG_NO_GPUS 1

#define NVML_CC_SYSTEM_ENVIRONMENT_SIM 1
#define NVML_CC_SYSTEM_ENVIRONMENT_PROD 2
#define NVML_CC_SYSTEM_CPU_CAPS_AMD_SNP_VTOM 4
#define NVML_CC_SYSTEM_GPUS_CC_CAPABLE 1
#define NVML_CC_SYSTEM_MULTIGPU_NONE 0
#define NVML_CC_SYSTEM_MULTIGPU_PROTECTED_PCIE 1
#define NVML_DEVICE_ARCH_HOPPER 9

#define NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE 80
#define NVML_DEVICE_NAME_V2_BUFFER_SIZE 96
#define NVML_DEVICE_UUID_V2_BUFFER_SIZE 96
#define NVML_DEVICE_VBIOS_VERSION_BUFFER_SIZE 32

#define NVML_GPU_CERT_CHAIN_SIZE 0x1000
#define NVML_GPU_ATTESTATION_CERT_CHAIN_SIZE 0x1400
#define NVML_CC_GPU_CEC_NONCE_SIZE 0x20
#define NVML_CC_GPU_ATTESTATION_REPORT_SIZE 0x2000
#define NVML_CC_GPU_CEC_ATTESTATION_REPORT_SIZE 0x1000

typedef struct nvmlDevice_st *nvmlDevice_t;

typedef struct nvmlConfComputeSystemState_st {
    unsigned int environment;
    unsigned int ccFeature;
    unsigned int devToolsMode;
} nvmlConfComputeSystemState_t;

typedef struct nvmlConfComputeSystemCaps_st {
    unsigned int cpuCaps;
    unsigned int gpusCaps;
} nvmlConfComputeSystemCaps_t;

typedef struct {
    unsigned int version;
    unsigned int environment;
    unsigned int ccFeature;
    unsigned int devToolsMode;
    unsigned int multiGpuMode;
} nvmlSystemConfComputeSettings_v1_t;

#define nvmlSystemConfComputeSettings_v1 \
    ((unsigned int)(sizeof(nvmlSystemConfComputeSettings_v1_t) | (1U << 24)))

typedef struct nvmlConfComputeGpuCertificate_st {
    unsigned int certChainSize;
    unsigned int attestationCertChainSize;
    unsigned char certChain[NVML_GPU_CERT_CHAIN_SIZE];
    unsigned char attestationCertChain[NVML_GPU_ATTESTATION_CERT_CHAIN_SIZE];
} nvmlConfComputeGpuCertificate_t;

typedef struct nvmlConfComputeGpuAttestationReport_st {
    unsigned int isCecAttestationReportPresent;
    unsigned int attestationReportSize;
    unsigned int cecAttestationReportSize;
    unsigned char nonce[NVML_CC_GPU_CEC_NONCE_SIZE];
    unsigned char attestationReport[NVML_CC_GPU_ATTESTATION_REPORT_SIZE];
    unsigned char cecAttestationReport[NVML_CC_GPU_CEC_ATTESTATION_REPORT_SIZE];
} nvmlConfComputeGpuAttestationReport_t;

/* ---- state ----------------------------------------------------------------------------- */

#define MAX_GPUS 8
#define STATE_ENV "CONFINFER_TESTBED_GPU_STATE"
#define STATE_MAX_BYTES 65536
#define STALL_MAX_MS 600000 /* stall_ms: at most ten minutes per call */

struct state {
    char path[PATH_MAX];
    char dir[PATH_MAX];
    int cc, devtools, env, gpus, lost, ready, multigpu, tamper, setter_root, stall_ms;
    char driver[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE];
    char vbios[NVML_DEVICE_VBIOS_VERSION_BUFFER_SIZE];
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
    char uuid[MAX_GPUS][NVML_DEVICE_UUID_V2_BUFFER_SIZE];
};

/* state.c */
nvmlReturn_t load_state(struct state *st);
nvmlReturn_t persist_ready(const struct state *st, unsigned int value);
void stall(void);

/* evidence.c */
nvmlReturn_t build_report(const struct state *st, unsigned int index,
                          nvmlConfComputeGpuAttestationReport_t *out);
long read_sibling(const struct state *st, const char *name, unsigned char *buf, size_t cap);

#endif
