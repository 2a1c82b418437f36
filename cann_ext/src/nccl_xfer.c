/* NCCL transfers: one group of sends or receives (cx_nccl_post) and the single calls it is made
 * of. Each call only enqueues work on the caller's CUDA stream; see backend_nccl.c for the
 * lifecycle and cann_ext.h for the contract. */
#include <stdint.h>
#include <stdio.h>

#include "nccl_api.h"

cx_status cx_nccl_group_start(void) {
    cx_status st = cx_nccl_require("cx_nccl_group_start", NULL, false);
    if (st != CX_OK) {
        return st;
    }
    return cx_nccl_finish("ncclGroupStart", cx_nccl_api.group_start(), NULL, NULL);
}

cx_status cx_nccl_group_end(int *in_progress) {
    cx_status st = cx_nccl_require("cx_nccl_group_end", NULL, false);
    if (st != CX_OK) {
        return st;
    }
    return cx_nccl_finish("ncclGroupEnd", cx_nccl_api.group_end(), NULL, in_progress);
}

static cx_status check_one(const char *fn, void *comm, const void *buf, uint64_t bytes,
                           int peer) {
    cx_status st = cx_nccl_require(fn, comm, true);
    if (st == CX_OK && (buf == NULL || bytes == 0 || peer < 0)) {
        st = cx_fail(CX_ERR_INVALID_ARG, "%s: need a buffer, bytes > 0 and a peer rank >= 0", fn);
    }
    return st;
}

cx_status cx_nccl_send(void *comm, const void *buf, uint64_t bytes, int peer, void *stream,
                       int *in_progress) {
    cx_status st = check_one("cx_nccl_send", comm, buf, bytes, peer);
    if (st != CX_OK) {
        return st;
    }
    cxn_result r = cx_nccl_api.send(buf, bytes, CXN_UINT8, peer, (cxn_comm)comm, stream);
    return cx_nccl_finish("ncclSend", r, (cxn_comm)comm, in_progress);
}

cx_status cx_nccl_recv(void *comm, void *buf, uint64_t bytes, int peer, void *stream,
                       int *in_progress) {
    cx_status st = check_one("cx_nccl_recv", comm, buf, bytes, peer);
    if (st != CX_OK) {
        return st;
    }
    cxn_result r = cx_nccl_api.recv(buf, bytes, CXN_UINT8, peer, (cxn_comm)comm, stream);
    return cx_nccl_finish("ncclRecv", r, (cxn_comm)comm, in_progress);
}

static cx_status check_ranges(uint64_t base, const uint64_t *offsets, const uint64_t *lengths,
                              size_t n) {
    if (base == 0 || offsets == NULL || lengths == NULL || n == 0) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_nccl_post: need a base address and n >= 1 ranges");
    }
    for (size_t i = 0; i < n; i++) {
        if (lengths[i] == 0 || offsets[i] > UINT64_MAX - base ||
            lengths[i] > UINT64_MAX - base - offsets[i]) {
            return cx_fail(CX_ERR_OUT_OF_RANGE, "cx_nccl_post: range %zu (offset %llu, length "
                           "%llu) is empty or overflows the address space", i,
                           (unsigned long long)offsets[i], (unsigned long long)lengths[i]);
        }
    }
    return CX_OK;
}

cx_status cx_nccl_post(void *comm, int is_recv, uint64_t base, const uint64_t *offsets,
                       const uint64_t *lengths, size_t n, int peer, void *stream,
                       int *in_progress) {
    cx_status st = cx_nccl_require("cx_nccl_post", comm, true);
    if (st == CX_OK) {
        st = check_ranges(base, offsets, lengths, n);
    }
    if (st != CX_OK || peer < 0 || in_progress == NULL) {
        return st != CX_OK ? st : cx_fail(CX_ERR_INVALID_ARG, "cx_nccl_post: bad peer or out");
    }
    cxn_result r = cx_nccl_api.group_start();
    if (r != CXN_SUCCESS) {
        return cx_nccl_fail("ncclGroupStart", r, (cxn_comm)comm);
    }
    cxn_result first = CXN_SUCCESS;
    size_t failed_at = 0;
    for (size_t i = 0; i < n && first == CXN_SUCCESS; i++) {
        void *buf = (void *)(uintptr_t)(base + offsets[i]);
        cxn_comm c = (cxn_comm)comm;
        r = is_recv ? cx_nccl_api.recv(buf, lengths[i], CXN_UINT8, peer, c, stream)
                    : cx_nccl_api.send(buf, lengths[i], CXN_UINT8, peer, c, stream);
        if (r != CXN_SUCCESS && r != CXN_IN_PROGRESS) {
            first = r;
            failed_at = i;
        }
    }
    /* Always closed: a group left open would swallow the caller's next NCCL calls. */
    r = cx_nccl_api.group_end();
    if (first != CXN_SUCCESS) {
        char call[64];
        snprintf(call, sizeof call, "%s of range %zu", is_recv ? "ncclRecv" : "ncclSend",
                 failed_at);
        return cx_nccl_fail(call, first, (cxn_comm)comm);
    }
    return cx_nccl_finish("ncclGroupEnd", r, (cxn_comm)comm, in_progress);
}
