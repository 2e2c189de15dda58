/*
 * libnvidia-ml.so.1 for the confinfer testbed: a confidential-computing H100 as NVML shows it.
 *
 * The exported symbols carry the real NVML names, C signatures, struct layouts and return codes
 * (nvml.h), so a client written against the real library (ctypes, pynvml, go-nvml) loads this
 * one unchanged. Where the real library exports versioned entry points (nvmlInit_v2,
 * nvmlDeviceGetCount_v2, nvmlDeviceGetHandleByIndex_v2) those are the primary names; the
 * unversioned ones are exported as well, as the real library does.
 *
 * SOURCES. This file holds the entry points; state.c reads and writes the state file,
 * evidence.c builds and signs attestation reports; fake_nvml.h has the nvml.h types they share.
 * testbed/gpu.py compiles them together: gcc -shared -fPIC -O2 ... *.c -lcrypto.
 *
 * STATE. Every call re-reads the file named by $CONFINFER_TESTBED_GPU_STATE, so a test changes
 * the GPU at run time by rewriting that file (testbed/gpu.py does it atomically). The file is
 * `key=value` lines; blank lines and lines starting with '#' are ignored, unknown keys too:
 *   cc=on|off                  confidential-computing feature (off: ccFeature 0, evidence calls
 *                              answer NVML_ERROR_NOT_SUPPORTED)
 *   devtools=on|off            CC DevTools mode (changes the mode measurement, block 8)
 *   env=production|simulation  CC environment (2 PROD, 1 SIM)
 *   gpus=N                     device count, 0..8
 *   lost=0|1                   1: every device call answers NVML_ERROR_GPU_IS_LOST (init works)
 *   ready=0|1                  CC GPUs ready state; nvmlSystemSetConfComputeGpusReadyState
 *                              rewrites this line in the file
 *   driver=STR vbios=STR name=STR
 *   uuids=GPU-...,GPU-...      device UUIDs by index (missing ones are derived from the index)
 *   multigpu=none|ppcie        multiGpuMode in the CC settings
 *   tamper=N                   corrupt measurement block N (1..8) in reports; 0 = none
 *   setter=root|any            who may set the ready state (the real library wants root)
 * An unset variable or unreadable file reads as "no driver": nvmlInit answers
 * NVML_ERROR_DRIVER_NOT_LOADED. A malformed file makes every call answer NVML_ERROR_UNKNOWN.
 *
 * FILES next to the state file (written by testbed/gpu.py):
 *   attestation-key.pem           PKCS#8 ECDSA P-384 key that signs attestation reports
 *   attestation-cert-chain.pem    PEM, leaf first: attestation cert, device cert, ICA, root
 *   cert-chain.pem                PEM, leaf first: device cert, ICA, root
 * The ready state is persisted under an exclusive flock on "<state>.lock" (gpu.py takes the same
 * lock), written to a temporary file and renamed over the state file.
 *
 * ATTESTATION REPORT (nvmlConfComputeGpuAttestationReport_t.attestationReport), modelled on the
 * H100's SPDM 1.1 GET_MEASUREMENTS exchange: the request message followed by the response message.
 * All integers little-endian. Offsets are from the start of attestationReport.
 *   Request (37 bytes)
 *     0x00  1  SPDMVersion          0x11
 *     0x01  1  RequestResponseCode  0xE0 (GET_MEASUREMENTS)
 *     0x02  1  Param1               0x01 (signature requested)
 *     0x03  1  Param2               0xFF (all measurement blocks)
 *     0x04 32  Nonce                the caller's 32-byte nonce, echoed byte for byte
 *     0x24  1  SlotIDParam          0x00
 *   Response (starts at 0x25)
 *     0x25  1  SPDMVersion          0x11
 *     0x26  1  RequestResponseCode  0x60 (MEASUREMENTS)
 *     0x27  1  Param1               0x00
 *     0x28  1  Param2               0x00 (slot id)
 *     0x29  1  NumberOfBlocks       8
 *     0x2A  3  MeasurementRecordLength  = 8 * 55 = 440
 *     0x2D 440 MeasurementRecord: 8 blocks of 55 bytes; block i (1..8) starts at 0x2D + 55*(i-1):
 *              +0 Index (i), +1 MeasurementSpecification (0x01, DMTF), +2 MeasurementSize u16 (51),
 *              +4 DMTFSpecMeasurementValueType (0x01 firmware, 0x03 configuration),
 *              +5 DMTFSpecMeasurementValueSize u16 (48), +7 value: 48-byte SHA-384 digest
 *              value_i = SHA-384("confinfer-testbed-gpu-measurement" 0x00 || u8(i) || component)
 *              component: blocks 1-4 "vbios:" VBIOS, blocks 5-7 "driver:" DRIVER,
 *              block 8 "mode:cc=on,devtools=on|off". testbed/gpu.py reference_measurements()
 *              gives the golden values (cc on, DevTools off) for a driver and VBIOS.
 *     0x1E5 32 Nonce                responder nonce (random per report)
 *     0x205 2  OpaqueLength
 *     0x207 n  OpaqueData: TLVs [type u16][size u16][data], all data NUL-terminated ASCII:
 *              3 DRIVER_VERSION, 4 GPU_INFO (the device UUID), 6 VBIOS_VERSION (the real GPU
 *              encodes this one in binary; the testbed keeps the text)
 *     0x207+n 96 Signature: ECDSA P-384 over SHA-384 of every preceding byte of the report
 *              (request and response), raw r || s, 48 bytes each, big-endian.
 *   attestationReportSize = 0x207 + n + 96. isCecAttestationReportPresent = 0.
 */

#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "fake_nvml.h"

#define EXPORT __attribute__((visibility("default")))
#define DEVICE_MAGIC 0x4e564d4cU /* "NVML" */

struct nvmlDevice_st {
    unsigned int magic;
    unsigned int index;
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned int g_init_count;
static struct nvmlDevice_st g_devices[MAX_GPUS];

/* Every entry point after init: initialised, state readable. */
static nvmlReturn_t enter(struct state *st)
{
    if (g_init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    return load_state(st);
}

/* Validate a device handle against the current state. */
static nvmlReturn_t device_of(const struct state *st, nvmlDevice_t device, unsigned int *index)
{
    uintptr_t first = (uintptr_t)&g_devices[0];
    uintptr_t at = (uintptr_t)device;
    if (at < first || at >= first + sizeof g_devices
        || (at - first) % sizeof g_devices[0] != 0 || device->magic != DEVICE_MAGIC)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (st->lost || device->index >= (unsigned int)st->gpus)
        return NVML_ERROR_GPU_IS_LOST;
    *index = device->index;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src)
{
    size_t n = strlen(src);
    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (length < n + 1)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, n + 1);
    return NVML_SUCCESS;
}

/* ---- library lifetime ------------------------------------------------------------------ */

static nvmlReturn_t do_init(unsigned int flags)
{
    struct state st;
    nvmlReturn_t rc;
    unsigned int i;
    pthread_mutex_lock(&g_lock);
    rc = load_state(&st);
    if (rc == NVML_SUCCESS && st.gpus == 0 && !(flags & NVML_INIT_FLAG_NO_GPUS))
        rc = NVML_ERROR_GPU_NOT_FOUND;
    if (rc == NVML_SUCCESS) {
        for (i = 0; i < MAX_GPUS; i++) {
            g_devices[i].magic = DEVICE_MAGIC;
            g_devices[i].index = i;
        }
        g_init_count++;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { return do_init(flags); }
EXPORT nvmlReturn_t nvmlInit_v2(void) { return do_init(0); }
EXPORT nvmlReturn_t nvmlInit(void) { return do_init(0); }

EXPORT nvmlReturn_t nvmlShutdown(void)
{
    nvmlReturn_t rc = NVML_SUCCESS;
    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0)
        rc = NVML_ERROR_UNINITIALIZED;
    else
        g_init_count--;
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt request issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 22: return "The requested vgpu operation is not available on target device, because ECC is enabled";
    case 23: return "Ran out of critical resources, other than memory";
    case 24: return "The requested frequency is not supported";
    case 25: return "Argument version mismatch";
    case 26: return "Deprecated";
    case 27: return "Not Ready";
    case 28: return "GPU Not Found";
    case 29: return "Invalid State";
    default: return "Unknown Error";
    }
}

/* ---- system queries -------------------------------------------------------------------- */

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    struct state st;
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS)
        rc = copy_string(version, length, st.driver);
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    struct state st;
    char text[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE + 8];
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS) {
        snprintf(text, sizeof text, "12.%s", st.driver);
        rc = copy_string(version, length, text);
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    struct state st;
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS) {
        if (deviceCount == NULL)
            rc = NVML_ERROR_INVALID_ARGUMENT;
        else
            *deviceCount = (unsigned int)st.gpus;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return nvmlDeviceGetCount_v2(deviceCount);
}

EXPORT nvmlReturn_t nvmlSystemGetConfComputeState(nvmlConfComputeSystemState_t *state)
{
    struct state st;
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS) {
        if (state == NULL) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            state->environment = (unsigned int)st.env;
            state->ccFeature = (unsigned int)st.cc;
            state->devToolsMode = (unsigned int)(st.cc && st.devtools);
        }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlSystemGetConfComputeCapabilities(nvmlConfComputeSystemCaps_t *caps)
{
    struct state st;
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS) {
        if (caps == NULL) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            caps->cpuCaps = NVML_CC_SYSTEM_CPU_CAPS_AMD_SNP_VTOM;
            caps->gpusCaps = NVML_CC_SYSTEM_GPUS_CC_CAPABLE;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlSystemGetConfComputeSettings(nvmlSystemConfComputeSettings_v1_t *settings)
{
    struct state st;
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS) {
        if (settings == NULL) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
        } else if (settings->version != nvmlSystemConfComputeSettings_v1) {
            rc = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
        } else {
            settings->environment = (unsigned int)st.env;
            settings->ccFeature = (unsigned int)st.cc;
            settings->devToolsMode = (unsigned int)(st.cc && st.devtools);
            settings->multiGpuMode = st.multigpu ? NVML_CC_SYSTEM_MULTIGPU_PROTECTED_PCIE
                                                 : NVML_CC_SYSTEM_MULTIGPU_NONE;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlSystemGetConfComputeGpusReadyState(unsigned int *isAcceptingWork)
{
    struct state st;
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS) {
        if (isAcceptingWork == NULL)
            rc = NVML_ERROR_INVALID_ARGUMENT;
        else
            *isAcceptingWork = (unsigned int)st.ready;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlSystemSetConfComputeGpusReadyState(unsigned int isAcceptingWork)
{
    struct state st;
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS) {
        if (isAcceptingWork > 1)
            rc = NVML_ERROR_INVALID_ARGUMENT;
        else if (st.setter_root && geteuid() != 0)
            rc = NVML_ERROR_NO_PERMISSION;
        else if (!st.cc)
            rc = NVML_ERROR_NOT_SUPPORTED;
        else
            rc = persist_ready(&st, isAcceptingWork);
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* ---- devices --------------------------------------------------------------------------- */

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    struct state st;
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS) {
        if (device == NULL || index >= (unsigned int)st.gpus)
            rc = NVML_ERROR_INVALID_ARGUMENT;
        else if (st.lost)
            rc = NVML_ERROR_GPU_IS_LOST;
        else
            *device = &g_devices[index];
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    struct state st;
    nvmlReturn_t rc;
    int i;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS) {
        if (uuid == NULL || device == NULL) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
        } else if (st.lost) {
            rc = NVML_ERROR_GPU_IS_LOST;
        } else {
            rc = NVML_ERROR_NOT_FOUND;
            for (i = 0; i < st.gpus; i++) {
                if (strcmp(uuid, st.uuid[i]) == 0) {
                    *device = &g_devices[i];
                    rc = NVML_SUCCESS;
                    break;
                }
            }
        }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

enum device_field { FIELD_NAME, FIELD_UUID, FIELD_VBIOS };

static nvmlReturn_t device_string(nvmlDevice_t device, enum device_field field, char *out,
                                  unsigned int length)
{
    struct state st;
    unsigned int index = 0;
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS)
        rc = device_of(&st, device, &index);
    if (rc == NVML_SUCCESS) {
        const char *value = field == FIELD_NAME   ? st.name
                            : field == FIELD_UUID ? st.uuid[index]
                                                  : st.vbios;
        rc = copy_string(out, length, value);
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    return device_string(device, FIELD_NAME, name, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    return device_string(device, FIELD_UUID, uuid, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetVbiosVersion(nvmlDevice_t device, char *version,
                                              unsigned int length)
{
    return device_string(device, FIELD_VBIOS, version, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetArchitecture(nvmlDevice_t device, unsigned int *arch)
{
    struct state st;
    unsigned int index = 0;
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS)
        rc = device_of(&st, device, &index);
    if (rc == NVML_SUCCESS) {
        if (arch == NULL)
            rc = NVML_ERROR_INVALID_ARGUMENT;
        else
            *arch = NVML_DEVICE_ARCH_HOPPER;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* ---- evidence -------------------------------------------------------------------------- */

EXPORT nvmlReturn_t nvmlDeviceGetConfComputeGpuAttestationReport(
    nvmlDevice_t device, nvmlConfComputeGpuAttestationReport_t *gpuAtstReport)
{
    struct state st;
    unsigned int index = 0;
    nvmlReturn_t rc;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS)
        rc = device_of(&st, device, &index);
    if (rc == NVML_SUCCESS) {
        if (gpuAtstReport == NULL)
            rc = NVML_ERROR_INVALID_ARGUMENT;
        else if (!st.cc)
            rc = NVML_ERROR_NOT_SUPPORTED;
        else
            rc = build_report(&st, index, gpuAtstReport);
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetConfComputeGpuCertificate(
    nvmlDevice_t device, nvmlConfComputeGpuCertificate_t *gpuCert)
{
    struct state st;
    unsigned int index = 0;
    nvmlReturn_t rc;
    long n;
    pthread_mutex_lock(&g_lock);
    rc = enter(&st);
    if (rc == NVML_SUCCESS)
        rc = device_of(&st, device, &index);
    if (rc == NVML_SUCCESS && gpuCert == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && !st.cc)
        rc = NVML_ERROR_NOT_SUPPORTED;
    if (rc == NVML_SUCCESS) {
        memset(gpuCert, 0, sizeof *gpuCert);
        n = read_sibling(&st, "cert-chain.pem", gpuCert->certChain, sizeof gpuCert->certChain);
        if (n < 0) {
            rc = NVML_ERROR_UNKNOWN;
        } else {
            gpuCert->certChainSize = (unsigned int)n;
            n = read_sibling(&st, "attestation-cert-chain.pem", gpuCert->attestationCertChain,
                             sizeof gpuCert->attestationCertChain);
            if (n < 0)
                rc = NVML_ERROR_UNKNOWN;
            else
                gpuCert->attestationCertChainSize = (unsigned int)n;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}
