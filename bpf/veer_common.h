/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What every veer program shares: the maps and protocol numbers.
 *
 * BCC rewrites map method calls (`map.lookup(...)`) only in the source text
 * it is handed, not in included files; so helpers that touch maps live in
 * veer_helpers.c, and the agent hands BCC the concatenation of
 * veer_helpers.c, sockmap.c, sock_lb.c and tc_nat.c (SOURCES in
 * agent/datapath/ebpf/programs.py).
 * Headers hold declarations only.
 */
#ifndef VEER_COMMON_H
#define VEER_COMMON_H

#include "veer_maps.h"

#define VEER_IPPROTO_TCP 6
#define VEER_IPPROTO_UDP 17

#endif /* VEER_COMMON_H */
