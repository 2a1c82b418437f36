/* HCCL communicators: HcclCommInitRootInfo on a join thread of its own (it blocks until every
 * rank joined, up to HCCL_CONNECT_TIMEOUT), polled by the caller; destruction that never blocks
 * the caller. See cann_ext.h for the contract.
 *
 * Lifecycle of one cx_hccl_comm:
 *   1. cx_hccl_comm_init copies the root info, starts the join thread and returns at once
 *      (state JOINING). The join thread makes the device current, takes the device's
 *      management mutex (HCCL's rule: concurrent inits only with one device per thread) and
 *      calls HcclCommInitRootInfo.
 *   2. cx_hccl_comm_poll answers in progress while JOINING; READY then reports
 *      HcclGetCommAsyncError; FAILED returns the init failure every time.
 *   3. cx_hccl_comm_destroy: while JOINING it only marks the record abandoned, and the join
 *      thread destroys what it made and frees the record; otherwise HcclCommDestroy runs on
 *      the caller's thread (wait = 1) or on a detached thread (wait = 0, so a communicator
 *      whose peer vanished can never hang the caller).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hccl_api.h"

namespace {

void free_record(cx_hccl_comm *c) {
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* Destroys a READY communicator and frees the record (the record belongs to the caller). */
HcclResult destroy_now(cx_hccl_comm *c) {
    HcclResult r = HCCL_SUCCESS;
    if (c->state == HCCL_COMM_READY) {
        /* Destroyed even where the device cannot be made current: HCCL knows its device. */
        (void)cx_hccl_use_device(c->device);
        pthread_mutex_t *mu = cx_hccl_device_mutex(c->device);
        pthread_mutex_lock(mu);
        r = cx_hccl_api.comm_destroy(c->comm);
        pthread_mutex_unlock(mu);
    }
    free_record(c);
    return r;
}

void *destroy_main(void *arg) {
    destroy_now(static_cast<cx_hccl_comm *>(arg));
    return NULL;
}

void *join_main(void *arg) {
    cx_hccl_comm *c = static_cast<cx_hccl_comm *>(arg);
    HcclComm comm = NULL;
    HcclResult r = HCCL_E_RUNTIME;
    char detail[sizeof c->detail] = "";
    if (cx_hccl_use_device(c->device) != CX_OK) {
        snprintf(detail, sizeof detail, "joining the communicator: %s", cx_last_error());
    } else {
        pthread_mutex_t *mu = cx_hccl_device_mutex(c->device);
        pthread_mutex_lock(mu);
        r = cx_hccl_api.comm_init_root_info(c->nranks, &c->root_info, c->rank, &comm);
        pthread_mutex_unlock(mu);
        if (r != HCCL_SUCCESS) {
            cx_hccl_describe(detail, sizeof detail, "HcclCommInitRootInfo", r);
        }
    }
    pthread_mutex_lock(&c->mu);
    c->result = r;
    c->comm = comm;
    c->state = r == HCCL_SUCCESS ? HCCL_COMM_READY : HCCL_COMM_FAILED;
    memcpy(c->detail, detail, sizeof detail);
    bool abandoned = c->abandoned;
    pthread_mutex_unlock(&c->mu);
    if (abandoned) {
        destroy_now(c); /* nobody holds the record any more */
    }
    return NULL;
}

cx_status check_init(const void *root_info, size_t len, uint32_t nranks, uint32_t rank,
                     void **out) {
    if (root_info == NULL || len != sizeof(HcclRootInfo) || out == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG,
                       "cx_hccl_comm_init: need a %zu-byte root info (HcclGetRootInfo) and an "
                       "out pointer, got %zu bytes", sizeof(HcclRootInfo), len);
    }
    if (nranks < 1 || rank >= nranks) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_hccl_comm_init: rank %u outside [0, %u)", rank,
                       nranks);
    }
    return CX_OK;
}

cx_hccl_comm *live(const char *fn, void *comm, cx_status *st) {
    *st = cx_hccl_require(fn);
    if (*st == CX_OK && comm == NULL) {
        *st = cx_fail(CX_ERR_INVALID_ARG, "%s: comm must not be NULL", fn);
    }
    return *st == CX_OK ? static_cast<cx_hccl_comm *>(comm) : NULL;
}

}  // namespace

extern "C" {

cx_status cx_hccl_comm_init(const void *root_info, size_t len, uint32_t nranks, uint32_t rank,
                            int32_t device, void **out) {
    cx_status st = cx_hccl_require("cx_hccl_comm_init");
    if (st == CX_OK) {
        st = check_init(root_info, len, nranks, rank, out);
    }
    if (st != CX_OK) {
        return st;
    }
    *out = NULL;
    cx_hccl_comm *c = static_cast<cx_hccl_comm *>(calloc(1, sizeof *c));
    if (c == NULL) {
        return cx_fail(CX_ERR_NO_MEMORY, "cx_hccl_comm_init: out of memory");
    }
    pthread_mutex_init(&c->mu, NULL);
    c->state = HCCL_COMM_JOINING;
    memcpy(&c->root_info, root_info, sizeof c->root_info);
    c->nranks = nranks;
    c->rank = rank;
    c->device = device;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    int rc = pthread_create(&thread, &attr, join_main, c);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        free_record(c);
        return cx_fail(CX_ERR_NO_MEMORY, "cx_hccl_comm_init: cannot start the join thread (%s)",
                       strerror(rc));
    }
    *out = c;
    return cx_ok();
}

cx_status cx_hccl_comm_poll(void *comm, int *in_progress) {
    cx_status st;
    cx_hccl_comm *c = live("cx_hccl_comm_poll", comm, &st);
    if (c == NULL || in_progress == NULL) {
        return c == NULL ? st : cx_fail(CX_ERR_INVALID_ARG, "cx_hccl_comm_poll: NULL out");
    }
    pthread_mutex_lock(&c->mu);
    hccl_comm_state state = c->state;
    HcclResult result = c->result;
    char detail[sizeof c->detail];
    memcpy(detail, c->detail, sizeof detail);
    pthread_mutex_unlock(&c->mu);
    *in_progress = state == HCCL_COMM_JOINING;
    if (state == HCCL_COMM_FAILED) {
        return cx_fail(cx_hccl_status(result), "%s", detail);
    }
    if (state == HCCL_COMM_JOINING || cx_hccl_api.get_comm_async_error == NULL) {
        return cx_ok();
    }
    HcclResult async = HCCL_SUCCESS;
    HcclResult r = cx_hccl_api.get_comm_async_error(c->comm, &async);
    if (r != HCCL_SUCCESS) {
        return cx_hccl_fail("HcclGetCommAsyncError", r);
    }
    return async == HCCL_SUCCESS ? cx_ok() : cx_hccl_fail("the communicator", async);
}

cx_status cx_hccl_comm_destroy(void *comm, int wait) {
    cx_status st;
    cx_hccl_comm *c = live("cx_hccl_comm_destroy", comm, &st);
    if (c == NULL) {
        return st;
    }
    pthread_mutex_lock(&c->mu);
    bool joining = c->state == HCCL_COMM_JOINING;
    c->abandoned = joining;
    pthread_mutex_unlock(&c->mu);
    if (joining) {
        return cx_ok(); /* the join thread cleans up once HcclCommInitRootInfo returns */
    }
    if (wait) {
        HcclResult r = destroy_now(c);
        return r == HCCL_SUCCESS ? cx_ok() : cx_hccl_fail("HcclCommDestroy", r);
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    int rc = pthread_create(&thread, &attr, destroy_main, c);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        /* No thread: leak the communicator rather than block on a peer that may be gone. */
        return cx_fail(CX_ERR_NO_MEMORY, "cx_hccl_comm_destroy: cannot start a thread (%s); "
                       "the communicator is leaked", strerror(rc));
    }
    return cx_ok();
}

}  // extern "C"
