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
 *   stall_ms=N                 every call (init, system and device calls; not nvmlShutdown or
 *                              nvmlErrorString) first sleeps N ms (0..600000), as a call into a
 *                              hung driver does; 0, the default, is no stall. The sleep happens
 *                              outside the library's lock; the call then answers from the state
 *                              as it is when the sleep ends
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

/* The logic of one entry point: the freshly read state and the call's own arguments. */
typedef nvmlReturn_t (*state_body)(const struct state *st, void *arg);
/* The same for a device call, once the handle has been validated: the device's index. */
typedef nvmlReturn_t (*device_body)(const struct state *st, unsigned int index, void *arg);

/*
 * The frame of every entry point after init: under g_lock, the library must be initialised and
 * the state file is re-read; only then does body run (still under the lock) on the call's args.
 */
static nvmlReturn_t with_state(state_body body, void *arg)
{
    struct state st;
    nvmlReturn_t rc;
    stall();
    pthread_mutex_lock(&g_lock);
    rc = g_init_count == 0 ? NVML_ERROR_UNINITIALIZED : load_state(&st);
    if (rc == NVML_SUCCESS)
        rc = body(&st, arg);
    pthread_mutex_unlock(&g_lock);
    return rc;
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

struct device_call {
    nvmlDevice_t device;
    device_body body;
    void *arg;
};

static nvmlReturn_t run_on_device(const struct state *st, void *arg)
{
    const struct device_call *call = arg;
    unsigned int index = 0;
    nvmlReturn_t rc = device_of(st, call->device, &index);
    return rc == NVML_SUCCESS ? call->body(st, index, call->arg) : rc;
}

/* with_state for a device call: body runs only for a valid handle to a present, working GPU. */
static nvmlReturn_t with_device(nvmlDevice_t device, device_body body, void *arg)
{
    struct device_call call = { device, body, arg };
    return with_state(run_on_device, &call);
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

/* Store one unsigned int in a caller's buffer. */
static nvmlReturn_t put_uint(unsigned int *dst, unsigned int value)
{
    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *dst = value;
    return NVML_SUCCESS;
}

/* A caller's string buffer. */
struct text_out {
    char *buf;
    unsigned int length;
};

/* ---- library lifetime ------------------------------------------------------------------ */

static nvmlReturn_t do_init(unsigned int flags)
{
    struct state st;
    nvmlReturn_t rc;
    unsigned int i;
    stall();
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

static nvmlReturn_t get_driver_version(const struct state *st, void *arg)
{
    const struct text_out *out = arg;
    return copy_string(out->buf, out->length, st->driver);
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    struct text_out out = { version, length };
    return with_state(get_driver_version, &out);
}

static nvmlReturn_t get_nvml_version(const struct state *st, void *arg)
{
    const struct text_out *out = arg;
    char text[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE + 8];
    snprintf(text, sizeof text, "12.%s", st->driver);
    return copy_string(out->buf, out->length, text);
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    struct text_out out = { version, length };
    return with_state(get_nvml_version, &out);
}

static nvmlReturn_t get_count(const struct state *st, void *arg)
{
    return put_uint(arg, (unsigned int)st->gpus);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    return with_state(get_count, deviceCount);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return nvmlDeviceGetCount_v2(deviceCount);
}

static nvmlReturn_t get_cc_state(const struct state *st, void *arg)
{
    nvmlConfComputeSystemState_t *state = arg;
    if (state == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    state->environment = (unsigned int)st->env;
    state->ccFeature = (unsigned int)st->cc;
    state->devToolsMode = (unsigned int)(st->cc && st->devtools);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlSystemGetConfComputeState(nvmlConfComputeSystemState_t *state)
{
    return with_state(get_cc_state, state);
}

static nvmlReturn_t get_cc_caps(const struct state *st, void *arg)
{
    nvmlConfComputeSystemCaps_t *caps = arg;
    (void)st;
    if (caps == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    caps->cpuCaps = NVML_CC_SYSTEM_CPU_CAPS_AMD_SNP_VTOM;
    caps->gpusCaps = NVML_CC_SYSTEM_GPUS_CC_CAPABLE;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlSystemGetConfComputeCapabilities(nvmlConfComputeSystemCaps_t *caps)
{
    return with_state(get_cc_caps, caps);
}

static nvmlReturn_t get_cc_settings(const struct state *st, void *arg)
{
    nvmlSystemConfComputeSettings_v1_t *settings = arg;
    if (settings == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (settings->version != nvmlSystemConfComputeSettings_v1)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    settings->environment = (unsigned int)st->env;
    settings->ccFeature = (unsigned int)st->cc;
    settings->devToolsMode = (unsigned int)(st->cc && st->devtools);
    settings->multiGpuMode = st->multigpu ? NVML_CC_SYSTEM_MULTIGPU_PROTECTED_PCIE
                                          : NVML_CC_SYSTEM_MULTIGPU_NONE;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlSystemGetConfComputeSettings(nvmlSystemConfComputeSettings_v1_t *settings)
{
    return with_state(get_cc_settings, settings);
}

static nvmlReturn_t get_ready(const struct state *st, void *arg)
{
    return put_uint(arg, (unsigned int)st->ready);
}

EXPORT nvmlReturn_t nvmlSystemGetConfComputeGpusReadyState(unsigned int *isAcceptingWork)
{
    return with_state(get_ready, isAcceptingWork);
}

static nvmlReturn_t set_ready(const struct state *st, void *arg)
{
    unsigned int value = *(const unsigned int *)arg;
    if (value > 1)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (st->setter_root && geteuid() != 0)
        return NVML_ERROR_NO_PERMISSION;
    if (!st->cc)
        return NVML_ERROR_NOT_SUPPORTED;
    return persist_ready(st, value);
}

EXPORT nvmlReturn_t nvmlSystemSetConfComputeGpusReadyState(unsigned int isAcceptingWork)
{
    return with_state(set_ready, &isAcceptingWork);
}

/* ---- devices --------------------------------------------------------------------------- */

struct handle_by_index {
    unsigned int index;
    nvmlDevice_t *device;
};

static nvmlReturn_t get_handle_by_index(const struct state *st, void *arg)
{
    const struct handle_by_index *q = arg;
    if (q->device == NULL || q->index >= (unsigned int)st->gpus)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (st->lost)
        return NVML_ERROR_GPU_IS_LOST;
    *q->device = &g_devices[q->index];
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    struct handle_by_index q = { index, device };
    return with_state(get_handle_by_index, &q);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

struct handle_by_uuid {
    const char *uuid;
    nvmlDevice_t *device;
};

static nvmlReturn_t get_handle_by_uuid(const struct state *st, void *arg)
{
    const struct handle_by_uuid *q = arg;
    int i;
    if (q->uuid == NULL || q->device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (st->lost)
        return NVML_ERROR_GPU_IS_LOST;
    for (i = 0; i < st->gpus; i++) {
        if (strcmp(q->uuid, st->uuid[i]) == 0) {
            *q->device = &g_devices[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    struct handle_by_uuid q = { uuid, device };
    return with_state(get_handle_by_uuid, &q);
}

enum device_field { FIELD_NAME, FIELD_UUID, FIELD_VBIOS };

struct device_text {
    enum device_field field;
    struct text_out out;
};

static nvmlReturn_t get_device_text(const struct state *st, unsigned int index, void *arg)
{
    const struct device_text *q = arg;
    const char *value = q->field == FIELD_NAME   ? st->name
                        : q->field == FIELD_UUID ? st->uuid[index]
                                                 : st->vbios;
    return copy_string(q->out.buf, q->out.length, value);
}

static nvmlReturn_t device_string(nvmlDevice_t device, enum device_field field, char *out,
                                  unsigned int length)
{
    struct device_text q = { field, { out, length } };
    return with_device(device, get_device_text, &q);
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

static nvmlReturn_t get_architecture(const struct state *st, unsigned int index, void *arg)
{
    (void)st;
    (void)index;
    return put_uint(arg, NVML_DEVICE_ARCH_HOPPER);
}

EXPORT nvmlReturn_t nvmlDeviceGetArchitecture(nvmlDevice_t device, unsigned int *arch)
{
    return with_device(device, get_architecture, arch);
}

/* ---- evidence -------------------------------------------------------------------------- */

static nvmlReturn_t get_report(const struct state *st, unsigned int index, void *arg)
{
    nvmlConfComputeGpuAttestationReport_t *report = arg;
    if (report == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!st->cc)
        return NVML_ERROR_NOT_SUPPORTED;
    return build_report(st, index, report);
}

EXPORT nvmlReturn_t nvmlDeviceGetConfComputeGpuAttestationReport(
    nvmlDevice_t device, nvmlConfComputeGpuAttestationReport_t *gpuAtstReport)
{
    return with_device(device, get_report, gpuAtstReport);
}

static nvmlReturn_t get_certificate(const struct state *st, unsigned int index, void *arg)
{
    nvmlConfComputeGpuCertificate_t *cert = arg;
    long n;
    (void)index;
    if (cert == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!st->cc)
        return NVML_ERROR_NOT_SUPPORTED;
    memset(cert, 0, sizeof *cert);
    n = read_sibling(st, "cert-chain.pem", cert->certChain, sizeof cert->certChain);
    if (n < 0)
        return NVML_ERROR_UNKNOWN;
    cert->certChainSize = (unsigned int)n;
    n = read_sibling(st, "attestation-cert-chain.pem", cert->attestationCertChain,
                     sizeof cert->attestationCertChain);
    if (n < 0)
        return NVML_ERROR_UNKNOWN;
    cert->attestationCertChainSize = (unsigned int)n;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetConfComputeGpuCertificate(
    nvmlDevice_t device, nvmlConfComputeGpuCertificate_t *gpuCert)
{
    return with_device(device, get_certificate, gpuCert);
}
