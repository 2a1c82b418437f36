"""FakeHccl: a fake libascendcl and libhccl, compiled from C here, for tests of cann_ext's real
HCCL backend on a machine without NPUs.

"Device memory" is host memory, a stream counts the operations enqueued and completed on it, and
the two ranks of a root info pair up in one process: HcclCommInitRootInfo blocks until the other
rank joined (or FAKE_HCCL_JOIN_S passed), sends and receives match in posting order and move
bytes with memcpy. The fake checks what the real libraries would refuse: the item layout and
dtype of HcclBatchSendRecv (declared here from CANN's documentation, independently of the
headers cann_ext compiles against), the peer rank, the 4108-byte root info, and that the calling
thread made a device current first. Test hooks: fake_acl_live / fake_hccl_live (leak counts),
fake_hccl_last_batch (the last batch's items as JSON), fake_hccl_set_async_error; environment:
FAKE_HCCL_INIT_FAIL=<HcclResult> fails every init (only rank FAKE_HCCL_FAIL_RANK's when set),
FAKE_HCCL_JOIN_S bounds a join (default 10 s).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CC = shutil.which("cc") or shutil.which("gcc")

FAKE_ACL = r"""
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct { uint64_t enq, done; int device; } fake_stream;
typedef struct { fake_stream *s; uint64_t seq; int recorded; } fake_event;

pthread_mutex_t fake_mu = PTHREAD_MUTEX_INITIALIZER; /* shared with the fake HCCL */
pthread_cond_t fake_cv = PTHREAD_COND_INITIALIZER;
static __thread int current = -1;
static int inits, live;
static char last_err[128];

int aclInit(const char *cfg) { (void)cfg; return __sync_fetch_and_add(&inits, 1) ? 100002 : 0; }
int aclrtSetDevice(int32_t d) {
    if (d < 0 || d > 1) { snprintf(last_err, sizeof last_err, "EE1001: no device %d", d);
                          return 107001; }
    current = d; return 0; }
int aclrtGetDevice(int32_t *d) { if (current < 0) return 107002; *d = current; return 0; }
int aclrtGetDeviceCount(uint32_t *n) { *n = 2; return 0; }
static void count(int delta) { pthread_mutex_lock(&fake_mu); live += delta;
                               pthread_mutex_unlock(&fake_mu); }
int aclrtCreateStream(void **s) {
    if (current < 0) return 107002;
    fake_stream *f = calloc(1, sizeof *f); f->device = current; *s = f; count(1); return 0; }
int aclrtDestroyStream(void *s) { free(s); count(-1); return 0; }
static int wait_stream(fake_stream *s, int32_t ms) {
    struct timespec t; clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += ms / 1000; t.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) { t.tv_sec++; t.tv_nsec -= 1000000000L; }
    int rc = 0;
    pthread_mutex_lock(&fake_mu);
    while (s->done < s->enq && rc != ETIMEDOUT) {
        rc = ms < 0 ? pthread_cond_wait(&fake_cv, &fake_mu)
                    : pthread_cond_timedwait(&fake_cv, &fake_mu, &t); }
    int ok = s->done >= s->enq;
    pthread_mutex_unlock(&fake_mu);
    return ok ? 0 : 507046; }
int aclrtSynchronizeStream(void *s) { return wait_stream(s, -1); }
#ifndef FAKE_OLD_ACL
int aclrtSynchronizeStreamWithTimeout(void *s, int32_t ms) { return wait_stream(s, ms); }
const char *aclGetRecentErrMsg(void) { return last_err[0] ? last_err : NULL; }
int aclrtDeviceGetUuid(int32_t d, void *u) {
    memset(u, 0, 16); snprintf(u, 16, "fake-npu-%d", d); return 0; }
#endif
int aclrtCreateEvent(void **e) { *e = calloc(1, sizeof(fake_event)); count(1); return 0; }
int aclrtDestroyEvent(void *e) { free(e); count(-1); return 0; }
int aclrtRecordEvent(void *e, void *s) {
    fake_event *ev = e; pthread_mutex_lock(&fake_mu);
    ev->s = s; ev->seq = ev->s->enq; ev->recorded = 1; pthread_mutex_unlock(&fake_mu); return 0; }
int aclrtQueryEventStatus(void *e, int *status) {
    fake_event *ev = e; pthread_mutex_lock(&fake_mu);
    *status = !ev->recorded || ev->s->done >= ev->seq; pthread_mutex_unlock(&fake_mu); return 0; }
int aclrtStreamWaitEvent(void *s, void *e) { return s == NULL || e == NULL ? 107000 : 0; }
int aclrtMalloc(void **p, size_t n, int policy) {
    (void)policy; if (current < 0) return 107002; *p = calloc(1, n); count(1); return 0; }
int aclrtFree(void *p) { free(p); count(-1); return 0; }
/* For the fake HCCL (fake_mu held) and the tests. */
void fake_stream_enqueue_locked(void *s) { ((fake_stream *)s)->enq++; }
void fake_stream_complete_locked(void *s) { ((fake_stream *)s)->done++;
                                            pthread_cond_broadcast(&fake_cv); }
void fake_set_error(const char *msg) { snprintf(last_err, sizeof last_err, "%s", msg); }
int fake_acl_live(void) { pthread_mutex_lock(&fake_mu); int n = live;
                          pthread_mutex_unlock(&fake_mu); return n; }
"""

FAKE_HCCL = r"""
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* From CANN's documentation, not from its headers. */
typedef struct { char internal[4108]; } HcclRootInfo;
typedef struct { int type; void *buf; uint64_t count; int dataType; uint32_t remoteRank; } Item;
enum { OK = 0, E_PARA = 1, E_INTERNAL = 4, E_TIMEOUT = 9, E_RUNTIME = 15, UINT8 = 7 };

extern pthread_mutex_t fake_mu;
extern pthread_cond_t fake_cv;
int aclrtGetDevice(int32_t *d);
void fake_stream_enqueue_locked(void *s);
void fake_stream_complete_locked(void *s);
void fake_set_error(const char *msg);

typedef struct op { struct op *next; char *buf; uint64_t n; int send; void *stream; } op;
struct pair;
typedef struct comm { struct pair *pair; uint32_t rank; int device, async_err;
                      op *head, *tail; } comm;
typedef struct pair { char key[64]; comm *ranks[2]; int gone; struct pair *next; } pair;
static pair *pairs;
static int live;
static unsigned long long made;
static char last_batch[4096];

int HcclGetRootInfo(HcclRootInfo *info) {
    int32_t dev;
    if (aclrtGetDevice(&dev) != 0) return E_RUNTIME;
    memset(info, 0, sizeof *info);
    snprintf(info->internal, 64, "fakeroot-%d-%d-%llu", (int)getpid(), dev,
             __sync_add_and_fetch(&made, 1));
    info->internal[4107] = 0x5a; /* the whole 4108 bytes must travel */
    return OK; }

static pair *find_pair(const HcclRootInfo *info) {
    for (pair *p = pairs; p; p = p->next) if (!strncmp(p->key, info->internal, 64)) return p;
    pair *p = calloc(1, sizeof *p); memcpy(p->key, info->internal, 63);
    p->next = pairs; pairs = p; return p; }

static void deadline_in(struct timespec *t, double s) {
    clock_gettime(CLOCK_REALTIME, t);
    long ns = t->tv_nsec + (long)((s - (long)s) * 1e9);
    t->tv_sec += (long)s + ns / 1000000000L; t->tv_nsec = ns % 1000000000L; }

int HcclCommInitRootInfo(uint32_t n, const HcclRootInfo *info, uint32_t rank, void **out) {
    int32_t dev;
    if (aclrtGetDevice(&dev) != 0) return E_RUNTIME;
    if (n != 2 || rank > 1 || (unsigned char)info->internal[4107] != 0x5a) return E_PARA;
    const char *fail = getenv("FAKE_HCCL_INIT_FAIL"), *only = getenv("FAKE_HCCL_FAIL_RANK");
    if (fail && (!only || (uint32_t)atoi(only) == rank)) {
        fake_set_error("EI9999: fake init failure"); return atoi(fail); }
    const char *join = getenv("FAKE_HCCL_JOIN_S");
    struct timespec t; deadline_in(&t, join ? atof(join) : 10.0);
    pthread_mutex_lock(&fake_mu);
    pair *p = find_pair(info);
    if (p->ranks[rank]) { pthread_mutex_unlock(&fake_mu); return E_PARA; }
    comm *c = calloc(1, sizeof *c); c->pair = p; c->rank = rank; c->device = dev;
    p->ranks[rank] = c; live++;
    pthread_cond_broadcast(&fake_cv);
    int rc = 0;
    while (!p->ranks[1 - rank] && !p->gone && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&fake_cv, &fake_mu, &t);
    if (!p->ranks[1 - rank]) {
        p->ranks[rank] = NULL; free(c); live--; pthread_mutex_unlock(&fake_mu); return E_TIMEOUT; }
    pthread_mutex_unlock(&fake_mu);
    *out = c; return OK; }

static void match(pair *p) {
    comm *a = p->ranks[0], *b = p->ranks[1];
    while (a && b && a->head && b->head) {
        op *x = a->head, *y = b->head;
        if (x->send == y->send || x->n != y->n) {
            a->async_err = b->async_err = E_INTERNAL; return; }
        op *s = x->send ? x : y, *r = x->send ? y : x;
        memcpy(r->buf, s->buf, s->n);
        a->head = x->next; b->head = y->next;
        if (!a->head) a->tail = NULL;
        if (!b->head) b->tail = NULL;
        fake_stream_complete_locked(x->stream); fake_stream_complete_locked(y->stream);
        free(x); free(y); } }

static int enqueue(comm *c, void *buf, uint64_t n, int send, uint32_t peer, void *stream) {
    if (peer != 1 - c->rank || buf == NULL || n == 0 || stream == NULL) return E_PARA;
    op *o = calloc(1, sizeof *o); o->buf = buf; o->n = n; o->send = send; o->stream = stream;
    if (c->tail) c->tail->next = o; else c->head = o;
    c->tail = o;
    fake_stream_enqueue_locked(stream);
    return OK; }

static int on_device(comm *c) { int32_t dev; return aclrtGetDevice(&dev) == 0 && dev == c->device; }

static int one(void *buf, uint64_t count, int dt, uint32_t peer, void *h, void *stream, int send) {
    comm *c = h;
    if (dt != UINT8) return E_PARA;
    if (!on_device(c)) return E_RUNTIME;
    pthread_mutex_lock(&fake_mu);
    int r = enqueue(c, buf, count, send, peer, stream);
    if (r == OK) match(c->pair);
    pthread_mutex_unlock(&fake_mu);
    return r; }

int HcclSend(void *buf, uint64_t count, int dt, uint32_t peer, void *c, void *s) {
    return one(buf, count, dt, peer, c, s, 1); }
int HcclRecv(void *buf, uint64_t count, int dt, uint32_t peer, void *c, void *s) {
    return one(buf, count, dt, peer, c, s, 0); }

#ifndef FAKE_NO_BATCH
int HcclBatchSendRecv(Item *items, uint32_t n, void *h, void *stream) {
    comm *c = h;
    size_t used = (size_t)snprintf(last_batch, sizeof last_batch, "{\"n\": %u, \"items\": [", n);
    for (uint32_t i = 0; i < n && i < 4; i++)
        used += (size_t)snprintf(last_batch + used, sizeof last_batch - used,
            "%s[%d, %lld, %llu, %d, %u]", i ? ", " : "", items[i].type,
            (long long)((char *)items[i].buf - (char *)items[0].buf),
            (unsigned long long)items[i].count, items[i].dataType, items[i].remoteRank);
    snprintf(last_batch + used, sizeof last_batch - used, "]}");
    for (uint32_t i = 0; i < n; i++)
        if (items[i].type < 0 || items[i].type > 1 || items[i].dataType != UINT8 ||
            items[i].count == 0 || items[i].remoteRank != 1 - c->rank) return E_PARA;
    if (!on_device(c)) return E_RUNTIME;
    pthread_mutex_lock(&fake_mu);
    for (uint32_t i = 0; i < n; i++)
        enqueue(c, items[i].buf, items[i].count, items[i].type == 0, items[i].remoteRank, stream);
    match(c->pair);
    pthread_mutex_unlock(&fake_mu);
    return OK; }
#endif

int HcclCommDestroy(void *h) {
    comm *c = h;
    pthread_mutex_lock(&fake_mu);
    for (op *o = c->head, *next; o; o = next) {  /* our ops end; the partner's keep waiting */
        next = o->next; fake_stream_complete_locked(o->stream); free(o); }
    pair *p = c->pair;
    p->ranks[c->rank] = NULL; p->gone = 1; live--;
    pthread_cond_broadcast(&fake_cv);
    pthread_mutex_unlock(&fake_mu);
    free(c); return OK; }

int HcclGetCommAsyncError(void *h, int *err) {
    pthread_mutex_lock(&fake_mu); *err = ((comm *)h)->async_err;
    pthread_mutex_unlock(&fake_mu); return OK; }

const char *HcclGetErrorString(int code) {
    switch (code) {
    case 9: return "EI0006: getting the socket timed out";
    case 11: return "EI0001: TCP connect failed";
    case 21: return "EI0015: error CQE";
    default: return "fake HCCL error"; } }

/* Test hooks. */
int fake_hccl_live(void) { pthread_mutex_lock(&fake_mu); int n = live;
                           pthread_mutex_unlock(&fake_mu); return n; }
const char *fake_hccl_last_batch(void) { return last_batch; }
void fake_hccl_set_async_error(int code) {
    pthread_mutex_lock(&fake_mu);
    for (pair *p = pairs; p; p = p->next)
        for (int r = 0; r < 2; r++) if (p->ranks[r]) p->ranks[r]->async_err = code;
    pthread_mutex_unlock(&fake_mu); }
"""


def build_fake_hccl(out: Path, variant: str = "full") -> tuple[Path, Path]:
    """Compiles (libascendcl, libhccl) fakes into `out`. Variants: "full"; "old" (an ACL
    without aclrtSynchronizeStreamWithTimeout, aclGetRecentErrMsg and aclrtDeviceGetUuid);
    "no_batch" (a libhccl without HcclBatchSendRecv)."""
    assert CC is not None, "no C compiler"
    out.mkdir(parents=True, exist_ok=True)
    (out / "acl.c").write_text(FAKE_ACL)
    (out / "hccl.c").write_text(FAKE_HCCL)
    acl, hccl = out / "libfake_ascendcl.so", out / "libfake_hccl.so"
    flags = ["-shared", "-fPIC", "-pthread", "-Wall"]
    acl_defs = ["-DFAKE_OLD_ACL"] if variant == "old" else []
    hccl_defs = ["-DFAKE_NO_BATCH"] if variant == "no_batch" else []
    subprocess.run([CC, *flags, *acl_defs, "-Wl,-soname,libfake_ascendcl.so", "-o", str(acl),
                    str(out / "acl.c")], check=True)
    subprocess.run([CC, *flags, *hccl_defs, "-o", str(hccl), str(out / "hccl.c"), f"-L{out}",
                    "-lfake_ascendcl", f"-Wl,-rpath,{out}"], check=True)
    return acl, hccl
