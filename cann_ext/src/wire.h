/* The host TCP wire format and blocking socket helpers.
 *
 * Every message is a 40-byte little-endian header, optionally followed by `length` payload bytes:
 *   magic u32 "CXW1" | version u16 | op u16 | id u64 | handle u32 | status u32 | offset u64 |
 *   length u64                                  (Python: struct "<IHHQIIQQ")
 * `id` names the sender's op (request id << 24 | index) and is echoed in the answer; `status`
 * is a cx_status, so a refused range comes back as a status rather than a dropped connection.
 */
#ifndef CANN_EXT_WIRE_H
#define CANN_EXT_WIRE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define CX_WIRE_MAGIC 0x31575843u /* "CXW1" read as little-endian u32 */
#define CX_WIRE_VERSION 1
#define CX_WIRE_HDR_BYTES 40
/* Exported memory descriptor: magic u32 "CXMD" | version u16 | kind u16 | nonce u64 |
 * handle u32 | reserved u32 | length u64 (Python: struct "<IHHQIIQ"). */
#define CX_DESC_MAGIC 0x444d5843u
#define CX_DESC_BYTES 32

typedef enum wire_op {
    W_HELLO = 1,      /* id: sender nonce; offset: the nonce the connector expects (from conn id) */
    W_READ_REQ = 2,   /* handle/offset/length: the sender wants these bytes */
    W_READ_RESP = 3,  /* status; on CX_OK `length` payload bytes follow */
    W_WRITE_REQ = 4,  /* handle/offset/length, then `length` payload bytes */
    W_WRITE_ACK = 5,  /* status */
    W_RECV_READY = 6, /* handle: tag; length: bytes the receiver expects */
    W_SEND_DATA = 7   /* id: the RECV_READY id; status; on CX_OK `length` payload bytes follow */
} wire_op;

typedef struct wire_hdr {
    uint16_t op;
    uint64_t id;
    uint32_t handle;
    uint32_t status;
    uint64_t offset;
    uint64_t length;
} wire_hdr;

void cx_wire_encode(const wire_hdr *h, uint8_t out[CX_WIRE_HDR_BYTES]);
/* Decodes and checks magic and version; 0 on success, else -1 with `err` describing why. */
int cx_wire_decode(const uint8_t in[CX_WIRE_HDR_BYTES], wire_hdr *h, char *err, size_t cap);

void cx_put_u16(uint8_t *p, uint16_t v);
void cx_put_u32(uint8_t *p, uint32_t v);
void cx_put_u64(uint8_t *p, uint64_t v);
uint16_t cx_get_u16(const uint8_t *p);
uint32_t cx_get_u32(const uint8_t *p);
uint64_t cx_get_u64(const uint8_t *p);

/* Reads exactly `len` bytes; returns how many arrived (< len: *err is errno, or 0 for EOF). */
uint64_t cx_recv_exact(int fd, void *buf, uint64_t len, int *err);
/* Reads and drops `len` bytes (a refused payload, so the stream stays framed). */
uint64_t cx_recv_drop(int fd, uint64_t len, int *err);
/* Sends every byte of iov[0..n) (modified in place); 0 or errno. No SIGPIPE. */
int cx_send_iov(int fd, struct iovec *iov, int n);
/* TCP_NODELAY, big socket buffers, keepalive. */
void cx_tune_socket(int fd);
/* Receive timeout for blocking reads (CX_TIMEOUT_INFINITE / 0: none). */
void cx_set_recv_timeout(int fd, uint32_t timeout_ms);
/* Connects to ip:port within timeout_ms; returns the fd or -1 with *err = errno. */
int cx_connect_tcp(const char *ip, uint16_t port, uint32_t timeout_ms, int *err);

#endif /* CANN_EXT_WIRE_H */
