/* SPDX-License-Identifier: Apache-2.0 */
/* Helpers every program uses. First part of the text the agent compiles
 * (see veer_common.h for why the parts are concatenated, not included). */
#include "veer_common.h"

static __always_inline void veer_count(__u32 idx)
{
	__u64 *counter = veer_counters.lookup(&idx);

	if (counter)
		*counter += 1;
}
