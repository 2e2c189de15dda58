/*
 * Attestation reports of the fake NVML: measurements, opaque data and the ECDSA P-384 signature
 * (libcrypto), in the layout documented in the header comment of fake_nvml.c; and the
 * certificate chains read from the files beside the state file.
 */

#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "fake_nvml.h"

/* Read a whole file beside the state file into buf; returns its size or -1. */
long read_sibling(const struct state *st, const char *name, unsigned char *buf, size_t cap)
{
    char path[PATH_MAX + 64];
    FILE *fp;
    size_t n;
    if (snprintf(path, sizeof path, "%s/%s", st->dir, name) >= (int)sizeof path)
        return -1;
    fp = fopen(path, "re");
    if (fp == NULL)
        return -1;
    n = fread(buf, 1, cap + 1, fp);
    fclose(fp);
    if (n > cap)
        return -2; /* does not fit */
    return (long)n;
}

#define MEASUREMENT_BLOCKS 8
#define DIGEST_SIZE 48
#define BLOCK_SIZE (4 + 3 + DIGEST_SIZE)
#define SIGNATURE_SIZE 96
#define MEASUREMENT_LABEL "confinfer-testbed-gpu-measurement"

static int measure(const struct state *st, int index, unsigned char out[DIGEST_SIZE])
{
    unsigned char input[256];
    char component[160];
    size_t label_len = sizeof MEASUREMENT_LABEL; /* includes the NUL */
    size_t comp_len;
    unsigned int md_len = 0;
    if (index <= 4)
        snprintf(component, sizeof component, "vbios:%s", st->vbios);
    else if (index <= 7)
        snprintf(component, sizeof component, "driver:%s", st->driver);
    else
        snprintf(component, sizeof component, "mode:cc=%s,devtools=%s", st->cc ? "on" : "off",
                 st->devtools ? "on" : "off");
    comp_len = strlen(component);
    if (label_len + 1 + comp_len > sizeof input)
        return -1;
    memcpy(input, MEASUREMENT_LABEL, label_len);
    input[label_len] = (unsigned char)index;
    memcpy(input + label_len + 1, component, comp_len);
    if (EVP_Digest(input, label_len + 1 + comp_len, out, &md_len, EVP_sha384(), NULL) != 1
        || md_len != DIGEST_SIZE)
        return -1;
    if (st->tamper == index)
        out[0] ^= 0xFF;
    return 0;
}

static void put_u16(unsigned char *p, unsigned int v)
{
    p[0] = (unsigned char)(v & 0xFF);
    p[1] = (unsigned char)((v >> 8) & 0xFF);
}

static size_t put_opaque(unsigned char *p, unsigned int type, const char *text)
{
    size_t n = strlen(text) + 1;
    put_u16(p, type);
    put_u16(p + 2, (unsigned int)n);
    memcpy(p + 4, text, n);
    return 4 + n;
}

/* ECDSA P-384 / SHA-384 over data with the key beside the state file; raw r||s into sig. */
static int sign_report(const struct state *st, const unsigned char *data, size_t len,
                       unsigned char sig[SIGNATURE_SIZE])
{
    char path[PATH_MAX + 64];
    EVP_PKEY *key = NULL;
    EVP_MD_CTX *ctx = NULL;
    ECDSA_SIG *esig = NULL;
    unsigned char der[160];
    const unsigned char *p = der;
    const BIGNUM *r = NULL, *s = NULL;
    size_t der_len = sizeof der;
    FILE *fp;
    int ok = -1;

    if (snprintf(path, sizeof path, "%s/attestation-key.pem", st->dir) >= (int)sizeof path)
        return -1;
    fp = fopen(path, "re");
    if (fp == NULL)
        return -1;
    key = PEM_read_PrivateKey(fp, NULL, NULL, NULL);
    fclose(fp);
    if (key == NULL || EVP_PKEY_get_base_id(key) != EVP_PKEY_EC || EVP_PKEY_get_bits(key) != 384)
        goto done;
    ctx = EVP_MD_CTX_new();
    if (ctx == NULL || EVP_DigestSignInit(ctx, NULL, EVP_sha384(), NULL, key) != 1)
        goto done;
    if (EVP_DigestSign(ctx, der, &der_len, data, len) != 1)
        goto done;
    esig = d2i_ECDSA_SIG(NULL, &p, (long)der_len);
    if (esig == NULL)
        goto done;
    ECDSA_SIG_get0(esig, &r, &s);
    if (BN_bn2binpad(r, sig, 48) != 48 || BN_bn2binpad(s, sig + 48, 48) != 48)
        goto done;
    ok = 0;
done:
    ECDSA_SIG_free(esig);
    EVP_MD_CTX_free(ctx);
    EVP_PKEY_free(key);
    return ok;
}

nvmlReturn_t build_report(const struct state *st, unsigned int index,
                                 nvmlConfComputeGpuAttestationReport_t *out)
{
    unsigned char *r = out->attestationReport;
    size_t off = 0, opaque_start;
    unsigned int record_len = MEASUREMENT_BLOCKS * BLOCK_SIZE;
    int i;

    memset(r, 0, NVML_CC_GPU_ATTESTATION_REPORT_SIZE);
    /* request */
    r[off++] = 0x11;
    r[off++] = 0xE0;
    r[off++] = 0x01;
    r[off++] = 0xFF;
    memcpy(r + off, out->nonce, NVML_CC_GPU_CEC_NONCE_SIZE);
    off += NVML_CC_GPU_CEC_NONCE_SIZE;
    r[off++] = 0x00;
    /* response */
    r[off++] = 0x11;
    r[off++] = 0x60;
    r[off++] = 0x00;
    r[off++] = 0x00;
    r[off++] = MEASUREMENT_BLOCKS;
    r[off++] = (unsigned char)(record_len & 0xFF);
    r[off++] = (unsigned char)((record_len >> 8) & 0xFF);
    r[off++] = (unsigned char)((record_len >> 16) & 0xFF);
    for (i = 1; i <= MEASUREMENT_BLOCKS; i++) {
        r[off] = (unsigned char)i;
        r[off + 1] = 0x01;
        put_u16(r + off + 2, 3 + DIGEST_SIZE);
        r[off + 4] = i == 8 ? 0x03 : 0x01;
        put_u16(r + off + 5, DIGEST_SIZE);
        if (measure(st, i, r + off + 7) != 0)
            return NVML_ERROR_UNKNOWN;
        off += BLOCK_SIZE;
    }
    if (RAND_bytes(r + off, 32) != 1)
        return NVML_ERROR_UNKNOWN;
    off += 32;
    opaque_start = off + 2;
    off = opaque_start;
    off += put_opaque(r + off, 3, st->driver);
    off += put_opaque(r + off, 4, st->uuid[index]);
    off += put_opaque(r + off, 6, st->vbios);
    put_u16(r + opaque_start - 2, (unsigned int)(off - opaque_start));
    if (off + SIGNATURE_SIZE > NVML_CC_GPU_ATTESTATION_REPORT_SIZE)
        return NVML_ERROR_UNKNOWN;
    if (sign_report(st, r, off, r + off) != 0)
        return NVML_ERROR_UNKNOWN;
    off += SIGNATURE_SIZE;
    out->attestationReportSize = (unsigned int)off;
    out->isCecAttestationReportPresent = 0;
    out->cecAttestationReportSize = 0;
    return NVML_SUCCESS;
}
