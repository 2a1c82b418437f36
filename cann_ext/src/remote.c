/* Exported memory descriptors: what a peer needs for one-sided WRITE/READ into a registration.
 *
 * A descriptor (CX_DESC_BYTES, layout in wire.h) names the registration handle, its length and
 * the exporting endpoint's nonce; cx_mem_import on the peer side refuses a descriptor whose
 * nonce is not the one its connection greeted (a stale descriptor from an earlier endpoint).
 * Imports live until cx_endpoint_destroy.
 */
#include <inttypes.h>
#include <string.h>

#include "internal.h"

remote_region *cx_remote_find(cx_endpoint *ep, cx_remote_handle handle) {
    return handle >= 1 && handle <= ep->num_remotes ? &ep->remotes[handle - 1] : NULL;
}

cx_status cx_mem_export(cx_endpoint *ep, cx_mem_handle handle, void *buf, size_t cap,
                        size_t *len) {
    if (ep == NULL || buf == NULL || len == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_export: arguments must not be NULL");
    }
    if (cap < CX_DESC_BYTES) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_export: buffer of %zu bytes, need %d", cap,
                       CX_DESC_BYTES);
    }
    pthread_mutex_lock(&ep->mu);
    const registration *r = cx_reg_find(ep, handle);
    uint8_t *p = buf;
    if (r != NULL) {
        cx_put_u32(p, CX_DESC_MAGIC);
        cx_put_u16(p + 4, 1);
        cx_put_u16(p + 6, (uint16_t)r->kind);
        cx_put_u64(p + 8, ep->nonce);
        cx_put_u32(p + 16, r->handle);
        cx_put_u32(p + 20, 0);
        cx_put_u64(p + 24, r->length);
        *len = CX_DESC_BYTES;
    }
    pthread_mutex_unlock(&ep->mu);
    if (r == NULL) {
        return cx_fail(CX_ERR_NOT_FOUND, "cx_mem_export: no registration %u", handle);
    }
    return cx_ok();
}

static cx_status import_locked(cx_endpoint *ep, cx_peer peer_id, const uint8_t *d,
                               cx_remote_handle *out) {
    const peer *p = cx_peer_get(ep, peer_id);
    if (p == NULL) {
        return cx_fail(CX_ERR_NOT_FOUND, "cx_mem_import: no peer %u", peer_id);
    }
    uint64_t nonce = cx_get_u64(d + 8);
    if (nonce != p->remote_nonce) {
        return cx_fail(CX_ERR_NOT_FOUND, "cx_mem_import: descriptor from endpoint %016" PRIx64
                       ", but peer %u is endpoint %016" PRIx64 " (a stale descriptor?)", nonce,
                       peer_id, p->remote_nonce);
    }
    if (cx_grow((void **)&ep->remotes, &ep->cap_remotes, ep->num_remotes + 1,
                sizeof *ep->remotes) != 0 || ep->num_remotes >= UINT32_MAX - 1) {
        return cx_fail(CX_ERR_NO_MEMORY, "cx_mem_import: out of memory");
    }
    remote_region *rr = &ep->remotes[ep->num_remotes++];
    *rr = (remote_region){(cx_remote_handle)ep->num_remotes, peer_id, cx_get_u32(d + 16),
                          cx_get_u64(d + 24)};
    *out = rr->handle;
    return CX_OK;
}

cx_status cx_mem_import(cx_endpoint *ep, cx_peer peer, const void *desc, size_t len,
                        cx_remote_handle *out) {
    if (ep == NULL || desc == NULL || out == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_import: arguments must not be NULL");
    }
    const uint8_t *d = desc;
    if (len != CX_DESC_BYTES || cx_get_u32(d) != CX_DESC_MAGIC || cx_get_u16(d + 4) != 1) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_import: not a host TCP memory descriptor "
                       "(%zu bytes)", len);
    }
    if (cx_get_u32(d + 16) == 0 || cx_get_u64(d + 24) == 0) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_import: descriptor names handle 0 or length 0");
    }
    pthread_mutex_lock(&ep->mu);
    cx_status st = import_locked(ep, peer, d, out);
    pthread_mutex_unlock(&ep->mu);
    return st == CX_OK ? cx_ok() : st;
}
