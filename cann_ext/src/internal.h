/* Private types and helpers shared by the cann_ext sources (host TCP backend included).
 *
 * Locking: one mutex per endpoint (ep->mu) guards everything below that is reachable from the
 * endpoint: registrations (and their pins), peers and their queues, imported regions, requests,
 * the accept queue. Threads never hold it across socket I/O: they pin what the I/O touches,
 * unlock, move bytes, relock. ep->cv wakes waiters on request completion and accepted peers.
 */
#ifndef CANN_EXT_INTERNAL_H
#define CANN_EXT_INTERNAL_H

#include <pthread.h>
#include <time.h>
#include <stdbool.h>

#include "cann_ext.h"
#include "wire.h"

#if defined(__GNUC__)
#define CX_PRINTF(fmt_index, first_arg) __attribute__((format(printf, fmt_index, first_arg)))
#else
#define CX_PRINTF(fmt_index, first_arg)
#endif

#define CX_DETAIL_BYTES 256
/* A batch's ops are numbered in the low bits of their wire id, the request id above them. */
#define CX_OP_INDEX_BITS 24
#define CX_MAX_BATCH ((size_t)1 << CX_OP_INDEX_BITS)
#define CX_DEFAULT_MAX_INFLIGHT 256

typedef struct registration {
    cx_mem_handle handle;
    uintptr_t addr;
    uint64_t length;
    cx_mem_kind kind;
    uint32_t pins;    /* our posted ops on it: deregister is BUSY while > 0 */
    uint32_t serving; /* a peer's READ/WRITE moving its bytes now: deregister waits for 0 */
} registration;

/* An imported peer registration (cx_mem_import). */
typedef struct remote_region {
    cx_remote_handle handle;
    cx_peer peer;
    uint32_t mem; /* the registration handle on the peer */
    uint64_t length;
} remote_region;

struct request;

/* One framed message waiting for a peer's sender thread. */
typedef struct tx_item {
    struct tx_item *next;
    uint8_t hdr[CX_WIRE_HDR_BYTES];
    const uint8_t *payload; /* registered memory, sent as is (no copy); NULL for none */
    uint64_t payload_len;
    bool owned;               /* malloc'ed (responses): the sender frees it once sent */
    cx_mem_handle unpin;      /* registration to unpin once sent; 0 none */
    struct request *done_req; /* op completed once sent (SEND data); NULL none */
    uint32_t done_index;
} tx_item;

/* A posted SEND op waiting for the peer's RECV, or a peer RECV waiting for our SEND. */
typedef struct match_slot {
    struct match_slot *next;
    uint32_t tag;
    uint64_t length;
    struct request *req; /* SEND side: our op */
    uint32_t index;
    uint64_t wire_id;    /* RECV side: the peer's op id, echoed in SEND_DATA */
} match_slot;

typedef struct slot_list {
    match_slot *head, *tail;
} slot_list;

typedef struct peer {
    cx_endpoint *ep;
    cx_peer id;
    int fd;
    uint64_t remote_nonce;
    bool dead;                    /* set once; the detail says why */
    char detail[CX_DETAIL_BYTES];
    int threads_alive;            /* rx + tx; the last one out fails what is left */
    pthread_t rx, tx;
    pthread_cond_t tx_cv;
    tx_item *tx_head, *tx_tail;
    slot_list sends;    /* our SEND ops not matched yet */
    slot_list readies;  /* the peer's RECV ops not matched yet */
} peer;

typedef struct request {
    struct request *next;
    cx_request id;
    cx_peer peer;
    cx_op op;
    size_t n, remaining;
    cx_status status; /* first failure wins */
    char detail[CX_DETAIL_BYTES];
    cx_xfer *xfers;       /* [n] copy of the caller's batch */
    uint8_t **local;      /* [n] resolved local addresses */
    uint32_t *remote_mem; /* [n] peer registration handles (WRITE/READ) */
    uint8_t *op_done;     /* [n] */
    tx_item *items;       /* [n] this request's outgoing messages */
} request;

struct cx_endpoint {
    cx_backend backend;
    int32_t device_id;
    uint32_t timeout_ms;
    uint32_t max_inflight;
    char bind_address[96];
    uint64_t nonce; /* random per endpoint: stale connection ids and descriptors are refused */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    registration *regs; /* live registrations, unordered */
    size_t num_regs, cap_regs;
    cx_mem_handle next_handle;
    /* listening side */
    int listen_fd;
    bool acceptor_started, closing;
    pthread_t acceptor;
    char conn_id[128];
    size_t conn_id_len;
    cx_peer *accepted; /* accepted peers not yet handed out by cx_endpoint_accept */
    size_t num_accepted, cap_accepted;
    /* peers, imports, requests */
    peer **peers; /* cx_peer p is peers[p - 1] */
    size_t num_peers, cap_peers;
    remote_region *remotes;
    size_t num_remotes, cap_remotes;
    request *requests;
    size_t num_requests;
    cx_request next_request;
};

/* ---- status.c ---- */
/* Records a detail message for the calling thread and returns `status`. */
cx_status cx_fail(cx_status status, const char *fmt, ...) CX_PRINTF(2, 3);
/* Clears the calling thread's detail message and returns CX_OK. */
cx_status cx_ok(void);
/* The monotonic-clock time timeout_ms from now (ignored for CX_TIMEOUT_INFINITE). */
struct timespec cx_deadline(uint32_t timeout_ms);
/* pthread_cond_wait, or a timed wait up to `deadline` unless timeout_ms is infinite; ETIMEDOUT. */
int cx_cond_wait(pthread_cond_t *cv, pthread_mutex_t *mu, uint32_t timeout_ms,
                 const struct timespec *deadline);
/* Grows *items (of *cap elements of `size`) to hold `need`; 0 on success. */
int cx_grow(void **items, size_t *cap, size_t need, size_t size);

/* ---- backend_nccl.c ---- */
/* 1 once cx_nccl_load succeeded in this process (cx_backend_available). */
int cx_nccl_is_loaded(void);

/* ---- backend_hccl.cc (C++; only in a build with CX_WITH_HCCL) ---- */
/* 1 once cx_hccl_load succeeded in this process (cx_backend_available). */
int cx_hccl_is_loaded(void);

/* ---- endpoint.c (ep->mu held) ---- */
registration *cx_reg_find(cx_endpoint *ep, cx_mem_handle handle);
/* Checks [offset, offset + length) against a live registration; sets the detail on failure. */
cx_status cx_reg_range(cx_endpoint *ep, cx_mem_handle handle, uint64_t offset, uint64_t length,
                       registration **out);
/* Drops one pin (serving: a peer's op, which may wake a waiting cx_mem_deregister). */
void cx_reg_unpin(cx_endpoint *ep, cx_mem_handle handle, bool serving);

/* ---- remote.c (ep->mu held) ---- */
remote_region *cx_remote_find(cx_endpoint *ep, cx_remote_handle handle);

/* ---- tcp.c ---- */
/* Stops the acceptor thread and closes the listening socket (ep->mu not held). */
void cx_listener_stop(cx_endpoint *ep);

/* ---- peer.c ---- */
/* Creates a peer for a connected, greeted socket and starts its threads (ep->mu held). */
cx_status cx_peer_start(cx_endpoint *ep, int fd, uint64_t remote_nonce, cx_peer *out);
peer *cx_peer_get(cx_endpoint *ep, cx_peer id);
void cx_peer_enqueue(peer *p, tx_item *item);
/* A progress thread of `p` is leaving because of `why`: marks the peer dead; the last thread
 * out frees its queues and fails its pending ops (takes ep->mu). */
void cx_peer_exit(peer *p, const char *why);
/* Pairs our SEND ops with the peer's RECVs of the same tag, oldest first (ep->mu held). */
void cx_peer_match(peer *p);
/* Closes every peer and joins its threads (ep->mu not held), then frees them. */
void cx_peers_stop(cx_endpoint *ep);

/* ---- rx.c ---- */
/* The receiver thread of a peer: serves the peer's READ/WRITE, lands answers to our posts. */
void *cx_rx_main(void *arg);

/* ---- xfer.c (ep->mu held) ---- */
request *cx_request_find(cx_endpoint *ep, cx_request id);
/* Completes op `index` of `req` once: unpins its local region and, for a failure, records
 * `detail` (the first failure of a request wins). Wakes waiters when the request is done. */
void cx_op_complete(cx_endpoint *ep, request *req, uint32_t index, cx_status status,
                    const char *detail);
/* Fails every op still pending on a dead peer with CX_ERR_CONNECTION and its detail. */
void cx_requests_fail_peer(cx_endpoint *ep, peer *p);

#endif /* CANN_EXT_INTERNAL_H */
