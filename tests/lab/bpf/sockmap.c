// SPDX-License-Identifier: GPL-2.0
//
// The sockmap short-cut of `lab bench --sockmap` (issue 16, item 4): an experiment that measures how far the
// floor of the in-pod design moves when the two loopback TCP legs of each connection (the app to its proxy
// inside the client pod, the proxy to the app inside the server pod) skip the kernel's TCP/IP path.
//
// `established` (sock_ops, attached to the cgroup-v2 root) adds every TCP socket that reaches ESTABLISHED in
// one of the chosen network namespaces, with its local and remote address equal (a connection that never
// leaves the namespace), to SOCKS, keyed by namespace and 4-tuple. `redirect` (sk_msg, attached to SOCKS)
// runs on each send of such a socket and queues the bytes straight onto its peer's receive queue. A socket
// whose peer is not in SOCKS keeps the normal path: the program never drops a message.
//
// Rebuild (Debian's clang and libbpf-dev) with tests/lab/bpf/build; the object beside this file is checked in.

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10

// One side of a connection inside one network namespace. Ports are in network byte order.
struct key {
	__u64 netns;
	__u32 local[4];
	__u32 remote[4];
	__u32 local_port;
	__u32 remote_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct key);
	__type(value, __u32);
} SOCKS SEC(".maps");

// The network namespaces (by cookie) whose in-namespace connections are short-cut; set by the loader.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u8);
} NETNS SEC(".maps");

// The kernel hands the remote port in network byte order in the upper 16 bits, the local one in host order;
// both are read 32 bits wide (narrower reads are refused on some kernels).
#define REMOTE_PORT(ctx) (*(volatile __u32 *)&(ctx)->remote_port >> 16)
#define LOCAL_PORT(ctx) (bpf_htonl(*(volatile __u32 *)&(ctx)->local_port) >> 16)

SEC("sockops")
int established(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	__u64 netns = bpf_get_netns_cookie(skops);
	if (!bpf_map_lookup_elem(&NETNS, &netns))
		return 1;
	struct key k = { .netns = netns, .local_port = LOCAL_PORT(skops), .remote_port = REMOTE_PORT(skops) };
	if (skops->family == AF_INET) {
		k.local[0] = skops->local_ip4;
		k.remote[0] = skops->remote_ip4;
	} else if (skops->family == AF_INET6) {
		k.local[0] = skops->local_ip6[0];
		k.local[1] = skops->local_ip6[1];
		k.local[2] = skops->local_ip6[2];
		k.local[3] = skops->local_ip6[3];
		k.remote[0] = skops->remote_ip6[0];
		k.remote[1] = skops->remote_ip6[1];
		k.remote[2] = skops->remote_ip6[2];
		k.remote[3] = skops->remote_ip6[3];
	} else {
		return 1;
	}
	if (k.local[0] != k.remote[0] || k.local[1] != k.remote[1] || k.local[2] != k.remote[2] ||
	    k.local[3] != k.remote[3])
		return 1;
	bpf_sock_hash_update(skops, &SOCKS, &k, BPF_NOEXIST);
	return 1;
}

SEC("sk_msg")
int redirect(struct sk_msg_md *msg)
{
	// The peer's key: the same namespace and addresses, the ports swapped.
	struct key peer = {
		.netns = bpf_get_netns_cookie(msg),
		.local_port = REMOTE_PORT(msg),
		.remote_port = LOCAL_PORT(msg),
	};
	if (msg->family == AF_INET) {
		peer.local[0] = msg->local_ip4;
		peer.remote[0] = msg->local_ip4;
	} else {
		peer.local[0] = msg->local_ip6[0];
		peer.local[1] = msg->local_ip6[1];
		peer.local[2] = msg->local_ip6[2];
		peer.local[3] = msg->local_ip6[3];
		peer.remote[0] = peer.local[0];
		peer.remote[1] = peer.local[1];
		peer.remote[2] = peer.local[2];
		peer.remote[3] = peer.local[3];
	}
	// Without the peer in SOCKS the redirect fails and the message takes the normal path.
	bpf_msg_redirect_hash(msg, &SOCKS, &peer, BPF_F_INGRESS);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
