/* HCCL transfers (HcclSend / HcclRecv / HcclBatchSendRecv of bytes) and the ACL streams,
 * events and device memory around them. Each call only enqueues work on an aclrtStream; see
 * backend_hccl.cc for the libraries and cann_ext.h for the contract. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hccl_api.h"

namespace {

/* The communicator of a READY record; CX_ERR_* naming `fn` otherwise. */
cx_status ready_comm(const char *fn, void *comm, cx_hccl_comm **out) {
    cx_status st = cx_hccl_require(fn);
    if (st != CX_OK) {
        return st;
    }
    if (comm == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "%s: comm must not be NULL", fn);
    }
    cx_hccl_comm *c = static_cast<cx_hccl_comm *>(comm);
    pthread_mutex_lock(&c->mu);
    hccl_comm_state state = c->state;
    pthread_mutex_unlock(&c->mu);
    if (state != HCCL_COMM_READY) {
        return cx_fail(CX_ERR_INVALID_ARG, "%s: the communicator is %s", fn,
                       state == HCCL_COMM_JOINING ? "still joining (poll until ready)"
                                                  : "broken (its init failed)");
    }
    *out = c;
    return cx_hccl_use_device(c->device);
}

cx_status check_ranges(uint64_t base, const uint64_t *offsets, const uint64_t *lengths,
                       size_t n) {
    if (base == 0 || offsets == NULL || lengths == NULL || n == 0 || n > UINT32_MAX) {
        return cx_fail(CX_ERR_INVALID_ARG,
                       "cx_hccl_post: need a base address and 1 <= n <= 2^32 - 1 ranges");
    }
    for (size_t i = 0; i < n; i++) {
        if (lengths[i] == 0 || offsets[i] > UINT64_MAX - base ||
            lengths[i] > UINT64_MAX - base - offsets[i]) {
            return cx_fail(CX_ERR_OUT_OF_RANGE, "cx_hccl_post: range %zu (offset %llu, length "
                           "%llu) is empty or overflows the address space", i,
                           (unsigned long long)offsets[i], (unsigned long long)lengths[i]);
        }
    }
    return CX_OK;
}

cx_status one(const char *fn, void *comm, void *buf, uint64_t bytes, uint32_t peer,
              void *stream, bool recv) {
    cx_hccl_comm *c = NULL;
    cx_status st = ready_comm(fn, comm, &c);
    if (st != CX_OK) {
        return st;
    }
    if (buf == NULL || bytes == 0) {
        return cx_fail(CX_ERR_INVALID_ARG, "%s: need a buffer and bytes > 0", fn);
    }
    /* Bytes as HCCL_DATA_TYPE_UINT8: counts are bytes whatever the tensor's dtype. */
    HcclResult r = recv ? cx_hccl_api.recv(buf, bytes, HCCL_DATA_TYPE_UINT8, peer, c->comm, stream)
                        : cx_hccl_api.send(buf, bytes, HCCL_DATA_TYPE_UINT8, peer, c->comm,
                                           stream);
    return r == HCCL_SUCCESS ? cx_ok() : cx_hccl_fail(recv ? "HcclRecv" : "HcclSend", r);
}

cx_status acl_result(const char *call, aclError err) {
    return err == ACL_SUCCESS ? cx_ok() : cx_acl_fail(call, err);
}

cx_status on_device(const char *fn, int32_t device, const void *handle) {
    cx_status st = cx_hccl_require(fn);
    if (st == CX_OK && handle == NULL) {
        st = cx_fail(CX_ERR_INVALID_ARG, "%s: NULL handle", fn);
    }
    return st == CX_OK ? cx_hccl_use_device(device) : st;
}

double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Stream sync with a deadline where libascendcl lacks aclrtSynchronizeStreamWithTimeout: an
 * event recorded on the stream, queried until it completes or the time is up. */
cx_status sync_by_event(void *stream, uint32_t timeout_ms) {
    aclrtEvent event = NULL;
    aclError err = cx_hccl_api.create_event(&event);
    if (err != ACL_SUCCESS) {
        return cx_acl_fail("aclrtCreateEvent", err);
    }
    err = cx_hccl_api.record_event(event, stream);
    double deadline = now_s() + timeout_ms / 1000.0;
    aclrtEventRecordedStatus status = ACL_EVENT_RECORDED_STATUS_NOT_READY;
    while (err == ACL_SUCCESS) {
        err = cx_hccl_api.query_event(event, &status);
        if (err != ACL_SUCCESS || status == ACL_EVENT_RECORDED_STATUS_COMPLETE ||
            now_s() > deadline) {
            break;
        }
        struct timespec pause = {0, 100000}; /* 0.1 ms */
        nanosleep(&pause, NULL);
    }
    cx_hccl_api.destroy_event(event);
    if (err != ACL_SUCCESS) {
        return cx_acl_fail("aclrtRecordEvent / aclrtQueryEventStatus", err);
    }
    if (status != ACL_EVENT_RECORDED_STATUS_COMPLETE) {
        return cx_fail(CX_ERR_TIMEOUT, "the stream did not finish within %u ms", timeout_ms);
    }
    return cx_ok();
}

}  // namespace

extern "C" {

cx_status cx_hccl_send(void *comm, const void *buf, uint64_t bytes, uint32_t peer, void *stream) {
    /* HcclSend takes a non-const buffer; it only reads it. */
    return one("cx_hccl_send", comm, const_cast<void *>(buf), bytes, peer, stream, false);
}

cx_status cx_hccl_recv(void *comm, void *buf, uint64_t bytes, uint32_t peer, void *stream) {
    return one("cx_hccl_recv", comm, buf, bytes, peer, stream, true);
}

cx_status cx_hccl_post(void *comm, int is_recv, uint64_t base, const uint64_t *offsets,
                       const uint64_t *lengths, size_t n, uint32_t peer, void *stream) {
    cx_hccl_comm *c = NULL;
    cx_status st = check_ranges(base, offsets, lengths, n);
    if (st == CX_OK) {
        st = ready_comm("cx_hccl_post", comm, &c);
    }
    if (st != CX_OK) {
        return st;
    }
    HcclSendRecvItem *items = static_cast<HcclSendRecvItem *>(calloc(n, sizeof *items));
    if (items == NULL) {
        return cx_fail(CX_ERR_NO_MEMORY, "cx_hccl_post: no memory for %zu items", n);
    }
    for (size_t i = 0; i < n; i++) {
        items[i].sendRecvType = is_recv ? HCCL_RECV : HCCL_SEND;
        items[i].buf = reinterpret_cast<void *>(static_cast<uintptr_t>(base + offsets[i]));
        items[i].count = lengths[i]; /* elements of HCCL_DATA_TYPE_UINT8: bytes */
        items[i].dataType = HCCL_DATA_TYPE_UINT8;
        items[i].remoteRank = peer;
    }
    HcclResult r = cx_hccl_api.batch_send_recv(items, static_cast<uint32_t>(n), c->comm, stream);
    free(items);
    return r == HCCL_SUCCESS ? cx_ok() : cx_hccl_fail("HcclBatchSendRecv", r);
}

cx_status cx_hccl_stream_create(int32_t device, void **stream) {
    cx_status st = on_device("cx_hccl_stream_create", device, stream);
    return st != CX_OK ? st : acl_result("aclrtCreateStream", cx_hccl_api.create_stream(stream));
}

cx_status cx_hccl_stream_destroy(int32_t device, void *stream) {
    cx_status st = on_device("cx_hccl_stream_destroy", device, stream);
    return st != CX_OK ? st
                       : acl_result("aclrtDestroyStream", cx_hccl_api.destroy_stream(stream));
}

cx_status cx_hccl_stream_sync(int32_t device, void *stream, uint32_t timeout_ms) {
    cx_status st = on_device("cx_hccl_stream_sync", device, stream);
    if (st != CX_OK) {
        return st;
    }
    if (timeout_ms == CX_TIMEOUT_INFINITE) {
        return acl_result("aclrtSynchronizeStream", cx_hccl_api.sync_stream(stream));
    }
    if (cx_hccl_api.sync_stream_timeout == NULL) {
        return sync_by_event(stream, timeout_ms);
    }
    int32_t ms = timeout_ms > INT32_MAX ? INT32_MAX : static_cast<int32_t>(timeout_ms);
    return acl_result("aclrtSynchronizeStreamWithTimeout",
                      cx_hccl_api.sync_stream_timeout(stream, ms));
}

cx_status cx_hccl_stream_wait_event(int32_t device, void *stream, void *event) {
    cx_status st = on_device("cx_hccl_stream_wait_event", device, event);
    if (st != CX_OK) {
        return st;
    }
    return acl_result("aclrtStreamWaitEvent", cx_hccl_api.stream_wait_event(stream, event));
}

cx_status cx_hccl_event_create(int32_t device, void **event) {
    cx_status st = on_device("cx_hccl_event_create", device, event);
    return st != CX_OK ? st : acl_result("aclrtCreateEvent", cx_hccl_api.create_event(event));
}

cx_status cx_hccl_event_record(int32_t device, void *event, void *stream) {
    cx_status st = on_device("cx_hccl_event_record", device, event);
    return st != CX_OK ? st
                       : acl_result("aclrtRecordEvent", cx_hccl_api.record_event(event, stream));
}

cx_status cx_hccl_event_query(int32_t device, void *event, int *done) {
    cx_status st = on_device("cx_hccl_event_query", device, event);
    if (st != CX_OK || done == NULL) {
        return st != CX_OK ? st : cx_fail(CX_ERR_INVALID_ARG, "cx_hccl_event_query: NULL out");
    }
    aclrtEventRecordedStatus status = ACL_EVENT_RECORDED_STATUS_NOT_READY;
    aclError err = cx_hccl_api.query_event(event, &status);
    *done = err == ACL_SUCCESS && status == ACL_EVENT_RECORDED_STATUS_COMPLETE;
    return acl_result("aclrtQueryEventStatus", err);
}

cx_status cx_hccl_event_destroy(int32_t device, void *event) {
    cx_status st = on_device("cx_hccl_event_destroy", device, event);
    return st != CX_OK ? st : acl_result("aclrtDestroyEvent", cx_hccl_api.destroy_event(event));
}

cx_status cx_hccl_malloc(int32_t device, uint64_t bytes, void **ptr) {
    cx_status st = on_device("cx_hccl_malloc", device, ptr);
    if (st != CX_OK || bytes == 0) {
        return st != CX_OK ? st : cx_fail(CX_ERR_INVALID_ARG, "cx_hccl_malloc: bytes must be > 0");
    }
    return acl_result("aclrtMalloc",
                      cx_hccl_api.malloc_device(ptr, bytes, ACL_MEM_MALLOC_HUGE_FIRST));
}

cx_status cx_hccl_free(int32_t device, void *ptr) {
    cx_status st = on_device("cx_hccl_free", device, ptr);
    return st != CX_OK ? st : acl_result("aclrtFree", cx_hccl_api.free_device(ptr));
}

}  // extern "C"
