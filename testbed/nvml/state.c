/*
 * The fake NVML's state file: parsing (every call re-reads it) and the one write the library
 * makes, the CC GPUs ready state. Keys and semantics: see the header comment of fake_nvml.c.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include "fake_nvml.h"

static int copy_value(char *dst, size_t size, const char *value)
{
    size_t n = strlen(value);
    if (n == 0 || n >= size)
        return -1;
    memcpy(dst, value, n + 1);
    return 0;
}

static int parse_switch(const char *value, const char *on, const char *off, int *out)
{
    if (strcmp(value, on) == 0)
        *out = 1;
    else if (strcmp(value, off) == 0)
        *out = 0;
    else
        return -1;
    return 0;
}

static int parse_uint(const char *value, int max, int *out)
{
    char *end = NULL;
    long v;
    if (*value == '\0')
        return -1;
    errno = 0;
    v = strtol(value, &end, 10);
    if (errno != 0 || *end != '\0' || v < 0 || v > max)
        return -1;
    *out = (int)v;
    return 0;
}

static int parse_uuids(struct state *st, const char *value)
{
    char buf[MAX_GPUS * NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    char *save = NULL, *tok;
    int i = 0;
    if (copy_value(buf, sizeof buf, value) != 0)
        return -1;
    for (tok = strtok_r(buf, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
        if (i >= MAX_GPUS || strncmp(tok, "GPU-", 4) != 0)
            return -1;
        if (copy_value(st->uuid[i], sizeof st->uuid[i], tok) != 0)
            return -1;
        i++;
    }
    return 0;
}

static char *trim(char *s)
{
    char *end;
    while (*s == ' ' || *s == '\t')
        s++;
    end = s + strlen(s);
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r' || end[-1] == '\n'))
        *--end = '\0';
    return s;
}

static int parse_line(struct state *st, char *line)
{
    char *eq, *key, *value;
    line = trim(line);
    if (*line == '\0' || *line == '#')
        return 0;
    eq = strchr(line, '=');
    if (eq == NULL)
        return -1;
    *eq = '\0';
    key = trim(line);
    value = trim(eq + 1);
    if (strcmp(key, "cc") == 0)
        return parse_switch(value, "on", "off", &st->cc);
    if (strcmp(key, "devtools") == 0)
        return parse_switch(value, "on", "off", &st->devtools);
    if (strcmp(key, "env") == 0) {
        int prod;
        if (parse_switch(value, "production", "simulation", &prod) != 0)
            return -1;
        st->env = prod ? NVML_CC_SYSTEM_ENVIRONMENT_PROD : NVML_CC_SYSTEM_ENVIRONMENT_SIM;
        return 0;
    }
    if (strcmp(key, "gpus") == 0)
        return parse_uint(value, MAX_GPUS, &st->gpus);
    if (strcmp(key, "lost") == 0)
        return parse_uint(value, 1, &st->lost);
    if (strcmp(key, "ready") == 0)
        return parse_uint(value, 1, &st->ready);
    if (strcmp(key, "tamper") == 0)
        return parse_uint(value, 8, &st->tamper);
    if (strcmp(key, "multigpu") == 0)
        return parse_switch(value, "ppcie", "none", &st->multigpu);
    if (strcmp(key, "setter") == 0)
        return parse_switch(value, "root", "any", &st->setter_root);
    if (strcmp(key, "stall_ms") == 0)
        return parse_uint(value, STALL_MAX_MS, &st->stall_ms);
    if (strcmp(key, "driver") == 0)
        return copy_value(st->driver, sizeof st->driver, value);
    if (strcmp(key, "vbios") == 0)
        return copy_value(st->vbios, sizeof st->vbios, value);
    if (strcmp(key, "name") == 0)
        return copy_value(st->name, sizeof st->name, value);
    if (strcmp(key, "uuids") == 0)
        return parse_uuids(st, value);
    return 0; /* unknown keys are ignored */
}

/* Read and parse the state file. */
nvmlReturn_t load_state(struct state *st)
{
    const char *path = getenv(STATE_ENV);
    char *buf, *save = NULL, *line, *slash;
    FILE *fp;
    size_t n;
    int i, bad = 0;

    memset(st, 0, sizeof *st);
    st->cc = 1;
    st->env = NVML_CC_SYSTEM_ENVIRONMENT_PROD;
    st->gpus = 1;
    st->setter_root = 1;
    strcpy(st->driver, "550.127.05");
    strcpy(st->vbios, "96.00.9F.00.04");
    strcpy(st->name, "NVIDIA H100 NVL");

    if (path == NULL || *path == '\0' || strlen(path) >= sizeof st->path)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    strcpy(st->path, path);
    strcpy(st->dir, path);
    slash = strrchr(st->dir, '/');
    if (slash == NULL)
        strcpy(st->dir, ".");
    else if (slash == st->dir)
        slash[1] = '\0';
    else
        *slash = '\0';

    fp = fopen(path, "re");
    if (fp == NULL)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    buf = malloc(STATE_MAX_BYTES + 1);
    if (buf == NULL) {
        fclose(fp);
        return NVML_ERROR_UNKNOWN;
    }
    n = fread(buf, 1, STATE_MAX_BYTES + 1, fp);
    fclose(fp);
    if (n > STATE_MAX_BYTES) {
        free(buf);
        return NVML_ERROR_UNKNOWN;
    }
    buf[n] = '\0';
    for (line = strtok_r(buf, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
        if (parse_line(st, line) != 0) {
            bad = 1;
            break;
        }
    }
    free(buf);
    if (bad)
        return NVML_ERROR_UNKNOWN;
    for (i = 0; i < MAX_GPUS; i++) {
        if (st->uuid[i][0] == '\0')
            snprintf(st->uuid[i], sizeof st->uuid[i], "GPU-00000000-0000-4000-8000-%012x", i);
    }
    return NVML_SUCCESS;
}

/*
 * Sleep for the state's stall_ms before a call does anything, as a hung driver would. It reads
 * the state on its own (outside g_lock, so that a stalled call does not serialise the others
 * behind it); a missing or malformed file stalls nothing, the call itself then reports it.
 */
void stall(void)
{
    struct state st;
    struct timespec left;
    if (load_state(&st) != NVML_SUCCESS || st.stall_ms <= 0)
        return;
    left.tv_sec = st.stall_ms / 1000;
    left.tv_nsec = (long)(st.stall_ms % 1000) * 1000000L;
    while (nanosleep(&left, &left) != 0 && errno == EINTR)
        ;
}

/* Rewrite the state file with "ready=<value>", under the shared lock, by rename. */
nvmlReturn_t persist_ready(const struct state *st, unsigned int value)
{
    char lock_path[PATH_MAX + 8], tmp_path[PATH_MAX + 32];
    char *buf = NULL, *save = NULL, *line;
    FILE *in = NULL, *out = NULL;
    nvmlReturn_t rc = NVML_ERROR_UNKNOWN;
    int lock_fd, written = 0;
    size_t n;

    if (snprintf(lock_path, sizeof lock_path, "%s.lock", st->path) >= (int)sizeof lock_path)
        return NVML_ERROR_UNKNOWN;
    if (snprintf(tmp_path, sizeof tmp_path, "%s.tmp.%ld", st->path, (long)getpid())
        >= (int)sizeof tmp_path)
        return NVML_ERROR_UNKNOWN;
    lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock_fd < 0)
        return NVML_ERROR_UNKNOWN;
    if (flock(lock_fd, LOCK_EX) != 0)
        goto done;
    in = fopen(st->path, "re");
    if (in == NULL)
        goto done;
    buf = malloc(STATE_MAX_BYTES + 1);
    if (buf == NULL)
        goto done;
    n = fread(buf, 1, STATE_MAX_BYTES + 1, in);
    if (n > STATE_MAX_BYTES)
        goto done;
    buf[n] = '\0';
    out = fopen(tmp_path, "we");
    if (out == NULL)
        goto done;
    for (line = strtok_r(buf, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
        const char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (strncmp(p, "ready", 5) == 0) {
            const char *q = p + 5;
            while (*q == ' ' || *q == '\t')
                q++;
            if (*q == '=') {
                if (!written)
                    fprintf(out, "ready=%u\n", value);
                written = 1;
                continue;
            }
        }
        fprintf(out, "%s\n", line);
    }
    if (!written)
        fprintf(out, "ready=%u\n", value);
    if (fflush(out) != 0 || fsync(fileno(out)) != 0)
        goto done;
    if (fclose(out) != 0) {
        out = NULL;
        goto done;
    }
    out = NULL;
    if (rename(tmp_path, st->path) != 0)
        goto done;
    rc = NVML_SUCCESS;
done:
    if (out != NULL)
        fclose(out);
    if (rc != NVML_SUCCESS)
        unlink(tmp_path);
    if (in != NULL)
        fclose(in);
    free(buf);
    close(lock_fd); /* releases the flock */
    return rc;
}
