/* NCCL backend: libnccl loaded with dlopen() at run time, wrapped as the cx_nccl_* calls.
 *
 * Lifecycle (pd_serve/kv/nccl_lib.py drives it):
 *   1. cx_nccl_load finds libnccl (an explicit path, else $PD_SERVE_NCCL_LIB, else libnccl.so.2
 *      and libnccl.so), resolves every symbol and checks the version (>= 2.17). Once loaded it
 *      stays loaded: NCCL starts threads, so it is never dlclose()d.
 *   2. One side calls cx_nccl_get_unique_id and sends the id out of band; both sides call
 *      cx_nccl_comm_init (a non-blocking communicator, so a dead peer cannot hang the caller)
 *      and poll cx_nccl_comm_poll until it is ready.
 *   3. cx_nccl_post (one group of sends or receives) or group_start / send / recv / group_end
 *      enqueue transfers on a CUDA stream. A non-blocking communicator may answer "in
 *      progress": poll cx_nccl_comm_poll until it is not before recording events on the stream
 *      or posting more.
 *   4. cx_nccl_comm_finalize (poll) + cx_nccl_comm_destroy for a healthy idle communicator;
 *      cx_nccl_comm_abort after an error or a timeout (it never waits for the peer).
 * Failures carry NCCL's own text (ncclGetErrorString, ncclGetLastError) in cx_last_error().
 */
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nccl_api.h"

#define NCCL_LIB_ENV "PD_SERVE_NCCL_LIB"

static pthread_mutex_t load_mu = PTHREAD_MUTEX_INITIALIZER;
nccl_api cx_nccl_api; /* complete before `loaded` is set; never changes afterwards */
static bool loaded;   /* guarded by load_mu */
static int loaded_version;

int cx_nccl_is_loaded(void) {
    pthread_mutex_lock(&load_mu);
    bool yes = loaded;
    pthread_mutex_unlock(&load_mu);
    return yes;
}

/* Copies dlsym results into function-pointer slots (memcpy: ISO C has no cast between object
 * and function pointers). Returns the first missing required symbol, or NULL. */
static const char *resolve(void *lib, nccl_api *out) {
    struct {
        const char *name;
        void *slot;
        bool required;
    } table[] = {
        {"ncclGetVersion", (void *)&out->get_version, true},
        {"ncclGetUniqueId", (void *)&out->get_unique_id, true},
        {"ncclCommInitRankConfig", (void *)&out->comm_init_rank_config, true},
        {"ncclCommGetAsyncError", (void *)&out->comm_get_async_error, true},
        {"ncclCommFinalize", (void *)&out->comm_finalize, true},
        {"ncclCommDestroy", (void *)&out->comm_destroy, true},
        {"ncclCommAbort", (void *)&out->comm_abort, true},
        {"ncclGroupStart", (void *)&out->group_start, true},
        {"ncclGroupEnd", (void *)&out->group_end, true},
        {"ncclSend", (void *)&out->send, true},
        {"ncclRecv", (void *)&out->recv, true},
        {"ncclGetErrorString", (void *)&out->get_error_string, true},
        {"ncclGetLastError", (void *)&out->get_last_error, false},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        void *sym = dlsym(lib, table[i].name);
        if (sym == NULL && table[i].required) {
            return table[i].name;
        }
        memcpy(table[i].slot, &sym, sizeof sym);
    }
    return NULL;
}

/* Appends "name (why); " to the list of candidates tried. */
static void note(char *tried, size_t cap, const char *name, const char *why) {
    size_t used = strlen(tried);
    if (used + 1 < cap) {
        snprintf(tried + used, cap - used, "%s (%s); ", name, why ? why : "unknown error");
    }
}

static bool try_candidate(const char *name, char *tried, size_t cap) {
    void *lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        note(tried, cap, name, dlerror());
        return false;
    }
    nccl_api found;
    memset(&found, 0, sizeof found);
    const char *missing = resolve(lib, &found);
    if (missing != NULL) {
        char why[96];
        snprintf(why, sizeof why, "not NCCL >= 2.17: no symbol %s", missing);
        note(tried, cap, name, why);
        dlclose(lib); /* not NCCL: nothing of it started */
        return false;
    }
    int version = 0;
    if (found.get_version(&version) != CXN_SUCCESS || version < CXN_MIN_VERSION) {
        char why[96];
        snprintf(why, sizeof why, "version code %d, need >= %d", version, CXN_MIN_VERSION);
        note(tried, cap, name, why);
        return false; /* kept open: its initialisers may have started something */
    }
    cx_nccl_api = found;
    loaded_version = version;
    loaded = true;
    return true;
}

static cx_status load_locked(const char *path) {
    const char *env = getenv(NCCL_LIB_ENV);
    const char *candidates[4];
    size_t n = 0;
    if (path != NULL && *path != '\0') {
        candidates[n++] = path;
    }
    if (env != NULL && *env != '\0') {
        candidates[n++] = env; /* set on purpose: no silent fallback to another copy */
    } else {
        candidates[n++] = "libnccl.so.2";
        candidates[n++] = "libnccl.so";
    }
    char tried[640] = "";
    for (size_t i = 0; i < n; i++) {
        if (try_candidate(candidates[i], tried, sizeof tried)) {
            return cx_ok();
        }
    }
    size_t used = strlen(tried);
    if (used >= 2) {
        tried[used - 2] = '\0'; /* the last "; " */
    }
    return cx_fail(CX_ERR_NOT_FOUND,
                   "cannot load libnccl: tried %s. Install the nvidia-nccl-cu12 or "
                   "nvidia-nccl-cu13 wheel (it ships site-packages/nvidia/nccl/lib/libnccl.so.2) "
                   "or set " NCCL_LIB_ENV " to the library's path",
                   tried);
}

cx_status cx_nccl_load(const char *path, int *version) {
    if (version == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_nccl_load: version must not be NULL");
    }
    pthread_mutex_lock(&load_mu);
    cx_status st = loaded ? cx_ok() : load_locked(path);
    *version = loaded ? loaded_version : 0;
    pthread_mutex_unlock(&load_mu);
    return st;
}

static const char *result_meaning(cxn_result r) {
    switch (r) {
    case CXN_UNHANDLED_CUDA_ERROR: return "a CUDA call failed";
    case CXN_SYSTEM_ERROR: return "a system call failed (socket, memory, thread)";
    case CXN_INTERNAL_ERROR: return "internal NCCL error";
    case CXN_INVALID_ARGUMENT: return "invalid argument";
    case CXN_INVALID_USAGE: return "invalid usage";
    case CXN_REMOTE_ERROR: return "the peer failed or went away";
    case CXN_IN_PROGRESS: return "still in progress";
    case CXN_TIMEOUT: return "timed out";
    default: return "unknown ncclResult_t";
    }
}

cx_status cx_nccl_fail(const char *call, cxn_result r, cxn_comm comm) {
    cx_status status = CX_ERR_BACKEND;
    if (r == CXN_REMOTE_ERROR) {
        status = CX_ERR_CONNECTION;
    } else if (r == CXN_TIMEOUT) {
        status = CX_ERR_TIMEOUT;
    } else if (r == CXN_INVALID_ARGUMENT || r == CXN_INVALID_USAGE) {
        status = CX_ERR_INVALID_ARG;
    }
    const char *text = cx_nccl_api.get_error_string(r);
    const char *last = NULL;
    if (cx_nccl_api.get_last_error != NULL) {
        last = cx_nccl_api.get_last_error(comm);
    }
    bool has_last = last != NULL && *last != '\0';
    return cx_fail(status, "%s failed: ncclResult_t %d, %s (%s)%s%s", call, r, result_meaning(r),
                   text != NULL ? text : "no text", has_last ? "; last NCCL error: " : "",
                   has_last ? last : "");
}

cx_status cx_nccl_require(const char *fn, const void *comm_or_null, bool need_comm) {
    if (!cx_nccl_is_loaded()) {
        return cx_fail(CX_ERR_UNSUPPORTED, "%s: libnccl is not loaded (call cx_nccl_load first)",
                       fn);
    }
    if (need_comm && comm_or_null == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "%s: comm must not be NULL", fn);
    }
    return CX_OK;
}

cx_status cx_nccl_get_unique_id(void *out, size_t cap) {
    cx_status st = cx_nccl_require("cx_nccl_get_unique_id", NULL, false);
    if (st != CX_OK) {
        return st;
    }
    if (out == NULL || cap < CXN_UNIQUE_ID_BYTES) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_nccl_get_unique_id: need a %d-byte buffer",
                       CXN_UNIQUE_ID_BYTES);
    }
    cxn_unique_id id;
    cxn_result r = cx_nccl_api.get_unique_id(&id);
    if (r != CXN_SUCCESS) {
        return cx_nccl_fail("ncclGetUniqueId", r, NULL);
    }
    memcpy(out, &id, sizeof id);
    return cx_ok();
}

cx_status cx_nccl_comm_init(const void *unique_id, size_t len, int nranks, int rank,
                            void **out) {
    cx_status st = cx_nccl_require("cx_nccl_comm_init", NULL, false);
    if (st != CX_OK) {
        return st;
    }
    if (unique_id == NULL || len != CXN_UNIQUE_ID_BYTES || out == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG,
                       "cx_nccl_comm_init: need a %d-byte unique id and an out pointer",
                       CXN_UNIQUE_ID_BYTES);
    }
    if (nranks < 1 || rank < 0 || rank >= nranks) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_nccl_comm_init: rank %d outside [0, %d)", rank,
                       nranks);
    }
    *out = NULL;
    cxn_unique_id id;
    memcpy(&id, unique_id, sizeof id);
    cxn_config config = {sizeof(cxn_config), CXN_CONFIG_MAGIC, CXN_CONFIG_VERSION, 0,
                         CXN_CONFIG_UNDEF_INT, CXN_CONFIG_UNDEF_INT, CXN_CONFIG_UNDEF_INT, NULL};
    cxn_comm comm = NULL;
    cxn_result r = cx_nccl_api.comm_init_rank_config(&comm, nranks, id, rank, &config);
    if (r != CXN_SUCCESS && r != CXN_IN_PROGRESS) {
        st = cx_nccl_fail("ncclCommInitRankConfig", r, comm);
        if (comm != NULL) {
            cx_nccl_api.comm_abort(comm);
        }
        return st;
    }
    *out = comm;
    return cx_ok();
}

cx_status cx_nccl_comm_poll(void *comm, int *in_progress) {
    cx_status st = cx_nccl_require("cx_nccl_comm_poll", comm, true);
    if (st != CX_OK || in_progress == NULL) {
        return st != CX_OK ? st : cx_fail(CX_ERR_INVALID_ARG, "cx_nccl_comm_poll: NULL out");
    }
    cxn_result state = CXN_SUCCESS;
    cxn_result r = cx_nccl_api.comm_get_async_error((cxn_comm)comm, &state);
    if (r != CXN_SUCCESS) {
        return cx_nccl_fail("ncclCommGetAsyncError", r, (cxn_comm)comm);
    }
    *in_progress = state == CXN_IN_PROGRESS;
    if (state != CXN_SUCCESS && state != CXN_IN_PROGRESS) {
        return cx_nccl_fail("the communicator", state, (cxn_comm)comm);
    }
    return cx_ok();
}

cx_status cx_nccl_finish(const char *call, cxn_result r, cxn_comm comm, int *in_progress) {
    if (r != CXN_SUCCESS && r != CXN_IN_PROGRESS) {
        return cx_nccl_fail(call, r, comm);
    }
    if (in_progress != NULL) {
        *in_progress = r == CXN_IN_PROGRESS;
    }
    return cx_ok();
}

cx_status cx_nccl_comm_finalize(void *comm, int *in_progress) {
    cx_status st = cx_nccl_require("cx_nccl_comm_finalize", comm, true);
    if (st != CX_OK) {
        return st;
    }
    cxn_result r = cx_nccl_api.comm_finalize((cxn_comm)comm);
    return cx_nccl_finish("ncclCommFinalize", r, (cxn_comm)comm, in_progress);
}

cx_status cx_nccl_comm_destroy(void *comm) {
    cx_status st = cx_nccl_require("cx_nccl_comm_destroy", comm, true);
    if (st != CX_OK) {
        return st;
    }
    return cx_nccl_finish("ncclCommDestroy", cx_nccl_api.comm_destroy((cxn_comm)comm), NULL, NULL);
}

cx_status cx_nccl_comm_abort(void *comm) {
    cx_status st = cx_nccl_require("cx_nccl_comm_abort", comm, true);
    if (st != CX_OK) {
        return st;
    }
    /* Abort never waits for the peer: NCCL's kernels poll an abort flag and exit. */
    return cx_nccl_finish("ncclCommAbort", cx_nccl_api.comm_abort((cxn_comm)comm), NULL, NULL);
}
