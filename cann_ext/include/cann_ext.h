/*
 * cann_ext: the one transport API of pd-serve's KV hand-off, plus the host-side block copy
 * kernels (gather / RecvScatter) that every transport needs.
 *
 * One API, several backends: host TCP (always built), NCCL and HCCL (built with the CMake
 * options CANN_EXT_WITH_NCCL / CANN_EXT_WITH_HCCL; vendor libraries are loaded at run time).
 *
 * WHAT IS BUILT TODAY:
 *   - version, status strings and the per-thread detail message;
 *   - the host TCP backend, every function below: endpoints, connection ids, connect/accept,
 *     registration, export/import, SEND/RECV/WRITE/READ batches, cx_test/cx_wait;
 *   - cx_gather_blocks / cx_scatter_blocks.
 *   - the NCCL backend as thin cx_nccl_* calls (libnccl loaded at run time, always built):
 *     2-rank communicators and grouped sends/receives of CUDA device memory, driven by
 *     pd_serve/kv/nccl*.py, which adds the control plane and the one-sided READ semantics.
 *     It is not (yet) behind cx_endpoint_create, which answers CX_ERR_UNSUPPORTED for
 *     CX_BACKEND_NCCL.
 *   - the HCCL backend as thin cx_hccl_* calls, built where CANN's headers are found (CMake
 *     option CANN_EXT_WITH_HCCL; libascendcl and libhccl loaded at run time): 2-rank
 *     communicators from a root info, HcclSend / HcclRecv / HcclBatchSendRecv of Ascend device
 *     memory on an aclrtStream, ACL streams and events for completion, driven by
 *     pd_serve/kv/hccl*.py. Not behind cx_endpoint_create either (CX_BACKEND_HCCL answers
 *     CX_ERR_UNSUPPORTED there). A build without it lacks the cx_hccl_* symbols.
 *
 * Host TCP in brief (wire format in src/wire.h): cx_endpoint_conn_id listens on
 * config.bind_address and returns "cx-tcp/1 <ip> <port> <nonce>"; each endpoint has an
 * acceptor thread, and each connected peer a receiver and a sender thread that serve the
 * peer's one-sided ops straight from / into registered memory (no staging copy) and land the
 * answers to our posts. A peer that closes mid-transfer or sends fewer bytes than announced
 * fails its pending ops with CX_ERR_CONNECTION ("partial transfer: got X of Y ... bytes").
 *
 * Endpoint lifecycle:
 *   1. cx_endpoint_create: allocate an endpoint for one backend (no I/O yet).
 *   2. cx_mem_register: register every buffer that transfers will touch (KV cache, slot buffers);
 *      the caller keeps the memory alive and unmoved until cx_mem_deregister.
 *   3. cx_endpoint_conn_id on the listening side; the blob travels out of band (our control
 *      plane) to the peer, which calls cx_endpoint_connect; the listener calls cx_endpoint_accept.
 *   4. For one-sided WRITE/READ, cx_mem_export a region, send the blob, cx_mem_import it on the
 *      peer side.
 *   5. cx_post a batch of transfers; poll cx_test or block in cx_wait until it completes.
 *   6. cx_mem_deregister every region, then cx_endpoint_destroy.
 *
 * Threading: an endpoint's functions may be called from any thread; an internal lock
 * serializes them with the endpoint's own progress threads, and cx_wait / cx_endpoint_accept
 * sleep without holding it. cx_endpoint_destroy must not race other calls on the same
 * endpoint. The copy kernels, the version and the status strings are safe from any thread.
 * Every function returns a cx_status; on failure cx_last_error() gives a one-line detail for
 * the calling thread (for a failed request: the first failed op and why).
 */
#ifndef CANN_EXT_H
#define CANN_EXT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define CX_API __attribute__((visibility("default")))
#else
#define CX_API
#endif

/* Bumped whenever a signature or struct below changes; the Python loader refuses a mismatch. */
#define CX_ABI_VERSION 1
#define CX_VERSION_STRING "0.1.0"

/* Timeout value meaning "wait forever". */
#define CX_TIMEOUT_INFINITE UINT32_MAX
/* Largest connection id blob (HCCL's root info is 4108 bytes, NCCL's unique id 128). */
#define CX_CONN_ID_MAX_BYTES 4352
/* Largest exported memory descriptor blob (HCCL's HcclMemDesc is 512 bytes). */
#define CX_MEM_DESC_MAX_BYTES 1024

typedef enum cx_status {
    CX_OK = 0,
    CX_ERR_INVALID_ARG = 1,  /* a NULL pointer, a zero size, a bad enum value, buffers overlap */
    CX_ERR_OUT_OF_RANGE = 2, /* a block id, offset or length outside its buffer */
    CX_ERR_NO_MEMORY = 3,
    CX_ERR_UNSUPPORTED = 4,  /* not built yet, or not available in this build */
    CX_ERR_NOT_FOUND = 5,    /* unknown memory handle, peer or request */
    CX_ERR_EXISTS = 6,       /* a registration overlapping an already registered range */
    CX_ERR_BUSY = 7,         /* the object still has live registrations, peers or requests */
    CX_ERR_TIMEOUT = 8,
    CX_ERR_CONNECTION = 9,   /* the peer went away or refused */
    CX_ERR_BACKEND = 10,     /* the vendor library (NCCL/HCCL) reported an error */
    CX_ERR_INTERNAL = 11     /* a broken invariant inside cann_ext: a bug */
} cx_status;

typedef enum cx_backend {
    CX_BACKEND_HOST_TCP = 0, /* host memory over TCP; always compiled in */
    CX_BACKEND_NCCL = 1,     /* CUDA device memory; CANN_EXT_WITH_NCCL */
    CX_BACKEND_HCCL = 2      /* Ascend device memory; CANN_EXT_WITH_HCCL */
} cx_backend;

typedef enum cx_mem_kind {
    CX_MEM_HOST = 0,
    CX_MEM_DEVICE = 1 /* device memory of cx_endpoint_config.device_id; NCCL/HCCL only */
} cx_mem_kind;

typedef enum cx_op {
    CX_OP_SEND = 0,  /* two-sided: matched by the peer's CX_OP_RECV with the same tag */
    CX_OP_RECV = 1,
    CX_OP_WRITE = 2, /* one-sided: local region -> imported remote region */
    CX_OP_READ = 3   /* one-sided: imported remote region -> local region */
} cx_op;

typedef struct cx_endpoint cx_endpoint; /* opaque */
typedef uint32_t cx_mem_handle;         /* a local registration; 0 is never valid */
typedef uint32_t cx_remote_handle;      /* an imported peer registration; 0 is never valid */
typedef uint32_t cx_peer;               /* a connected peer of one endpoint */
typedef uint64_t cx_request;            /* one posted batch; freed once cx_test/cx_wait say done */

typedef struct cx_endpoint_config {
    cx_backend backend;
    int32_t device_id;          /* -1 for host; the CUDA / Ascend device otherwise */
    const char *bind_address;   /* host TCP: "ip:port" to listen on ("127.0.0.1:0" = any port) */
    uint32_t timeout_ms;        /* default for connect/accept/wait; CX_TIMEOUT_INFINITE allowed */
    uint32_t max_inflight;      /* posted batches not yet completed; 0 = backend default */
} cx_endpoint_config;

/* One byte range of a batch. */
typedef struct cx_xfer {
    cx_mem_handle local;        /* registered region on this side */
    uint64_t local_offset;      /* bytes from the region's start */
    uint64_t length;            /* bytes to move; > 0 */
    cx_remote_handle remote;    /* WRITE/READ: imported region; SEND/RECV: 0 */
    uint64_t remote_offset;     /* WRITE/READ: bytes from the remote region's start */
    uint32_t tag;               /* SEND/RECV: matching key; WRITE/READ: 0 */
} cx_xfer;

/* A paged KV cache seen as num_planes planes (one per layer and K|V) of num_blocks blocks. */
typedef struct cx_block_layout {
    uint64_t num_planes;   /* num_layers * 2 for a [num_layers, 2, num_blocks, ...] cache */
    uint64_t num_blocks;   /* blocks per plane; valid block ids are [0, num_blocks) */
    uint64_t block_bytes;  /* bytes of one block within one plane */
    uint64_t plane_stride; /* bytes from plane p to plane p + 1 in the paged cache */
    uint64_t block_stride; /* bytes from block b to block b + 1 within one plane */
} cx_block_layout;

/* ---- version and errors (built) ---- */

CX_API const char *cx_version(void);
CX_API int cx_abi_version(void);
/* Static text naming a status; never NULL ("unknown status" for values outside the enum). */
CX_API const char *cx_status_string(cx_status status);
/* Detail of the calling thread's last failure ("" if none); valid until its next cx_ call. */
CX_API const char *cx_last_error(void);
/* 1 if transfers of this backend work here, else 0 (host TCP: always 1; NCCL: once
 * cx_nccl_load succeeded; HCCL: once cx_hccl_load succeeded, never in a build without it). */
CX_API int cx_backend_available(cx_backend backend);

/* ---- endpoint ---- */

/* Allocates an endpoint; no I/O. NCCL/HCCL: CX_ERR_UNSUPPORTED unless built with them. */
CX_API cx_status cx_endpoint_create(const cx_endpoint_config *config, cx_endpoint **out);
/* Closes every peer, stops the progress threads and frees the endpoint. CX_ERR_BUSY (nothing
 * freed) while registrations remain or requests are not yet reaped by cx_test/cx_wait.
 * NULL is a no-op. */
CX_API cx_status cx_endpoint_destroy(cx_endpoint *ep);
/* Starts listening (first call) and writes the connection id blob to publish
 * (<= CX_CONN_ID_MAX_BYTES). Host TCP: bind_address must be the IPv4 address peers dial. */
CX_API cx_status cx_endpoint_conn_id(cx_endpoint *ep, void *buf, size_t cap, size_t *len);
/* Connects to the peer whose connection id blob is given; blocks up to timeout_ms
 * (CX_ERR_TIMEOUT; CX_ERR_CONNECTION when refused or the id is stale). */
CX_API cx_status cx_endpoint_connect(cx_endpoint *ep, const void *conn_id, size_t len,
                                     uint32_t timeout_ms, cx_peer *peer);
/* Returns the next connection the acceptor took in; blocks up to timeout_ms (CX_ERR_TIMEOUT).
 * Needs cx_endpoint_conn_id first. Peers live until cx_endpoint_destroy. */
CX_API cx_status cx_endpoint_accept(cx_endpoint *ep, uint32_t timeout_ms, cx_peer *peer);

/* ---- memory registration ---- */

/* Records [addr, addr + length) for transfers. Ranges may not overlap an existing registration
 * (CX_ERR_EXISTS). The caller owns the memory and keeps it alive until cx_mem_deregister. */
CX_API cx_status cx_mem_register(cx_endpoint *ep, void *addr, uint64_t length, cx_mem_kind kind,
                                 cx_mem_handle *out);
/* Forgets a registration. CX_ERR_NOT_FOUND for an unknown handle, CX_ERR_BUSY while a
 * transfer (ours or a peer's) is moving its bytes. */
CX_API cx_status cx_mem_deregister(cx_endpoint *ep, cx_mem_handle handle);
/* Address and length of a live registration. */
CX_API cx_status cx_mem_query(const cx_endpoint *ep, cx_mem_handle handle, void **addr,
                              uint64_t *length);
/* Number of live registrations (for leak checks). */
CX_API cx_status cx_mem_count(const cx_endpoint *ep, size_t *count);
/* Describes a registration for a peer's one-sided access (<= CX_MEM_DESC_MAX_BYTES). */
CX_API cx_status cx_mem_export(cx_endpoint *ep, cx_mem_handle handle, void *buf, size_t cap,
                               size_t *len);
/* Imports a peer's exported descriptor for WRITE/READ. CX_ERR_NOT_FOUND when the descriptor
 * comes from another endpoint than `peer` (stale). Imports live until cx_endpoint_destroy. */
CX_API cx_status cx_mem_import(cx_endpoint *ep, cx_peer peer, const void *desc, size_t len,
                               cx_remote_handle *out);

/* ---- transfers ---- */

/* Posts n transfers of one op to one peer as one request; returns at once. Every range is
 * checked against its registration before anything moves (CX_ERR_OUT_OF_RANGE); the peer
 * checks again and answers a refusal (unknown or deregistered handle, range) as that op's
 * status. n <= 2^24; CX_ERR_BUSY beyond max_inflight live requests. A SEND completes once its
 * bytes are handed to the socket, the other ops once the peer confirmed them. */
CX_API cx_status cx_post(cx_endpoint *ep, cx_peer peer, cx_op op, const cx_xfer *xfers, size_t n,
                         cx_request *out);
/* Non-blocking: *done = 1 once the request finished; the return value is then its final status
 * and the request is freed. While *done = 0 it returns CX_OK. */
CX_API cx_status cx_test(cx_endpoint *ep, cx_request request, int *done);
/* Blocks until the request finishes (its final status; request freed) or timeout_ms passes
 * (CX_ERR_TIMEOUT; request still live). */
CX_API cx_status cx_wait(cx_endpoint *ep, cx_request request, uint32_t timeout_ms);

/* ---- host block copy kernels (built) ---- */

/* Gathers blocks block_ids[0..num_ids) of every plane of the paged cache into `contig`, plane
 * major: block i of plane p lands at byte (p * num_ids + i) * block_bytes. For a
 * [num_layers, 2, num_blocks, ...] cache this is [layer0.K | layer0.V | layer1.K | ...].
 * Checks: the layout fits in paged_bytes, contig_bytes == num_planes * num_ids * block_bytes,
 * every id in [0, num_blocks), the two buffers do not overlap. Nothing is written on failure. */
CX_API cx_status cx_gather_blocks(const void *paged, uint64_t paged_bytes,
                                  const cx_block_layout *layout, const int64_t *block_ids,
                                  uint64_t num_ids, void *contig, uint64_t contig_bytes);
/* The reverse (RecvScatter): writes `contig`, laid out as cx_gather_blocks produces it, into the
 * given blocks of the paged cache. Same checks, plus no block id may repeat. */
CX_API cx_status cx_scatter_blocks(void *paged, uint64_t paged_bytes,
                                   const cx_block_layout *layout, const int64_t *block_ids,
                                   uint64_t num_ids, const void *contig, uint64_t contig_bytes);

/* ---- NCCL backend (built; libnccl loaded at run time) ----
 *
 * libnccl is found by cx_nccl_load: `path` when given, then $PD_SERVE_NCCL_LIB when set (only
 * that file: a path set on purpose never falls back to another copy), else libnccl.so.2 and
 * libnccl.so on the loader's search path. The nvidia-nccl-cu12 / nvidia-nccl-cu13 wheels ship
 * it as site-packages/nvidia/nccl/lib/libnccl.so.2; pd_serve.kv.nccl_lib finds that file (or
 * the copy torch already mapped) and passes its full path. NCCL >= 2.17 is required.
 *
 * Communicators are non-blocking (ncclConfig_t.blocking = 0): init, group ends and finalize may
 * answer "in progress" (*in_progress = 1, CX_OK); poll cx_nccl_comm_poll until it is 0 before
 * recording events on the stream or posting more, and abort on your own deadline. `comm` is an
 * ncclComm_t and `stream` a cudaStream_t, both as void *. NCCL failures return CX_ERR_BACKEND
 * (CX_ERR_CONNECTION for ncclRemoteError, CX_ERR_INVALID_ARG for invalid argument/usage) with
 * NCCL's texts in cx_last_error(); calls before a successful load return CX_ERR_UNSUPPORTED.
 * Like NCCL itself, a communicator must be used by one thread at a time.
 */

/* Loads libnccl once per process (later calls only report the version, NCCL_VERSION_CODE
 * style, e.g. 22805). CX_ERR_NOT_FOUND naming every candidate tried and why it failed. */
CX_API cx_status cx_nccl_load(const char *path, int *version);
/* Writes a fresh 128-byte ncclUniqueId (cap >= 128) for the other rank to receive. */
CX_API cx_status cx_nccl_get_unique_id(void *out, size_t cap);
/* Starts joining communicator `unique_id` (len 128) as `rank` of `nranks` on the calling
 * thread's current CUDA device; returns at once, poll cx_nccl_comm_poll until ready. */
CX_API cx_status cx_nccl_comm_init(const void *unique_id, size_t len, int nranks, int rank,
                                   void **comm);
/* ncclCommGetAsyncError: CX_OK with *in_progress 0 (ready) or 1, else the error. */
CX_API cx_status cx_nccl_comm_poll(void *comm, int *in_progress);
/* Flushes and quiesces a healthy communicator (poll until ready), before cx_nccl_comm_destroy. */
CX_API cx_status cx_nccl_comm_finalize(void *comm, int *in_progress);
CX_API cx_status cx_nccl_comm_destroy(void *comm);
/* Frees the communicator and stops its kernels without waiting for the peer. */
CX_API cx_status cx_nccl_comm_abort(void *comm);
CX_API cx_status cx_nccl_group_start(void);
CX_API cx_status cx_nccl_group_end(int *in_progress);
/* One ncclSend / ncclRecv of `bytes` bytes (ncclUint8) with rank `peer`, enqueued on `stream`. */
CX_API cx_status cx_nccl_send(void *comm, const void *buf, uint64_t bytes, int peer,
                              void *stream, int *in_progress);
CX_API cx_status cx_nccl_recv(void *comm, void *buf, uint64_t bytes, int peer, void *stream,
                              int *in_progress);
/* One group of n sends (is_recv 0) or receives (1) of the ranges base + offsets[i],
 * lengths[i] (bytes, each > 0), in order, with rank `peer` on `stream`. Ranges are checked
 * only for emptiness and address overflow: the caller checks them against its buffers. */
CX_API cx_status cx_nccl_post(void *comm, int is_recv, uint64_t base, const uint64_t *offsets,
                              const uint64_t *lengths, size_t n, int peer, void *stream,
                              int *in_progress);

/* ---- HCCL backend (built where CANN's headers were found; libraries loaded at run time) ----
 *
 * cx_hccl_load finds libascendcl then libhccl: the given path, else $PD_SERVE_ACL_LIB /
 * $PD_SERVE_HCCL_LIB when set (only that file), else libascendcl.so / libhccl.so on the loader's
 * search path (CANN's set_env.sh puts its lib64 there); it then calls aclInit(NULL), accepting a
 * framework's earlier initialisation. Calls before a successful load return CX_ERR_UNSUPPORTED.
 *
 * `comm` is a record of cann_ext (not an HcclComm), `stream` an aclrtStream and `event` an
 * aclrtEvent, all as void * (none may be NULL). Each call that touches a device first makes
 * `device` (the communicator's, for transfers) current on the calling thread. Data moves as
 * HCCL_DATA_TYPE_UINT8, so counts are bytes. HCCL failures carry HcclResult, its meaning,
 * HcclGetErrorString and aclGetRecentErrMsg in cx_last_error(), mapped to a cx_status:
 * HCCL_E_PARA/PTR -> CX_ERR_INVALID_ARG, MEMORY/OOM -> CX_ERR_NO_MEMORY, NOT_SUPPORT ->
 * CX_ERR_UNSUPPORTED, NOT_FOUND -> CX_ERR_NOT_FOUND, TIMEOUT -> CX_ERR_TIMEOUT, TCP/RoCE
 * connect/transfer, NETWORK, REMOTE -> CX_ERR_CONNECTION, AGAIN/SUSPENDING -> CX_ERR_BUSY, the
 * rest CX_ERR_BACKEND. Like HCCL itself, a communicator is used by one thread at a time.
 */

/* Loads libascendcl and libhccl once per process; CX_ERR_NOT_FOUND naming every file tried. */
CX_API cx_status cx_hccl_load(const char *acl_path, const char *hccl_path);
CX_API cx_status cx_hccl_device_count(uint32_t *count);
/* The device's 16-byte UUID (aclrtDeviceGetUuid; CX_ERR_UNSUPPORTED on CANN without it). */
CX_API cx_status cx_hccl_device_uuid(int32_t device, void *out, size_t cap, size_t *len);
/* HcclGetRootInfo on `device` (this process becomes the root, so it joins as rank 0); writes
 * sizeof(HcclRootInfo) (4108) bytes. */
CX_API cx_status cx_hccl_get_root_info(int32_t device, void *out, size_t cap, size_t *len);
/* Starts HcclCommInitRootInfo(nranks, root_info, rank) on `device` on a thread of its own and
 * returns at once; poll cx_hccl_comm_poll until *in_progress is 0. Inits (and destroys) are
 * serialised per device (HCCL's rule); HCCL_CONNECT_TIMEOUT bounds a join nobody answers. */
CX_API cx_status cx_hccl_comm_init(const void *root_info, size_t len, uint32_t nranks,
                                   uint32_t rank, int32_t device, void **comm);
/* CX_OK with *in_progress 1 while joining, 0 once ready (then HcclGetCommAsyncError is
 * checked); the init's or the communicator's error otherwise. */
CX_API cx_status cx_hccl_comm_poll(void *comm, int *in_progress);
/* Frees the communicator (HcclCommDestroy): on this thread with wait = 1, on a detached thread
 * with wait = 0 (never blocks on a vanished peer). Also valid while joining. */
CX_API cx_status cx_hccl_comm_destroy(void *comm, int wait);
/* One HcclSend / HcclRecv of `bytes` bytes with rank `peer`, enqueued on `stream`. HCCL pairs
 * them strictly: the peer must post the matching call before either side posts the next. */
CX_API cx_status cx_hccl_send(void *comm, const void *buf, uint64_t bytes, uint32_t peer,
                              void *stream);
CX_API cx_status cx_hccl_recv(void *comm, void *buf, uint64_t bytes, uint32_t peer,
                              void *stream);
/* One HcclBatchSendRecv of n items, all sends (is_recv 0) or all receives (1), of the ranges
 * base + offsets[i], lengths[i] (bytes, each > 0), in order, with rank `peer` on `stream`.
 * Ranges are checked only for emptiness and overflow: the caller checks them against its
 * buffers. n < 2^32. */
CX_API cx_status cx_hccl_post(void *comm, int is_recv, uint64_t base, const uint64_t *offsets,
                              const uint64_t *lengths, size_t n, uint32_t peer, void *stream);
CX_API cx_status cx_hccl_stream_create(int32_t device, void **stream);
CX_API cx_status cx_hccl_stream_destroy(int32_t device, void *stream);
/* Blocks until the stream's work finished or timeout_ms passed (CX_ERR_TIMEOUT). */
CX_API cx_status cx_hccl_stream_sync(int32_t device, void *stream, uint32_t timeout_ms);
/* Work enqueued on `stream` after this waits for `event` (aclrtStreamWaitEvent). */
CX_API cx_status cx_hccl_stream_wait_event(int32_t device, void *stream, void *event);
CX_API cx_status cx_hccl_event_create(int32_t device, void **event);
CX_API cx_status cx_hccl_event_record(int32_t device, void *event, void *stream);
/* Non-blocking: *done = 1 once the work before the event's record completed. */
CX_API cx_status cx_hccl_event_query(int32_t device, void *event, int *done);
CX_API cx_status cx_hccl_event_destroy(int32_t device, void *event);
/* Device memory (aclrtMalloc, huge pages first), e.g. for a pair's warm-up bytes. */
CX_API cx_status cx_hccl_malloc(int32_t device, uint64_t bytes, void **ptr);
CX_API cx_status cx_hccl_free(int32_t device, void *ptr);

#ifdef __cplusplus
}
#endif

#endif /* CANN_EXT_H */
