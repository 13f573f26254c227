//! `lab`: run Ambit's lab by hand (`lab demo`) or clean up after one (`lab clean`).

use clap::{Parser, Subcommand};

/// Ambit's lab: a cluster made of network namespaces.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a two-node lab, run traffic through the mesh and check every step.
    Demo {
        /// Leave the lab running afterwards (remove it with `lab clean --all`).
        #[arg(long)]
        keep: bool,
    },
    /// Measure: the mesh against direct TCP between the same pods (throughput, latency, connection rate,
    /// ztunnel memory and CPU), and CNI enrolment and passthrough latency.
    Bench {
        /// Print one JSON object instead of the readable report.
        #[arg(long)]
        json: bool,
        /// Only one part: `mesh`, `cni` or `xds` (the control plane: pushes and certificates).
        #[arg(long)]
        only: Option<String>,
        /// Workloads in the xDS part's mesh.
        #[arg(long, default_value_t = 10_000)]
        xds_workloads: usize,
        /// Policies in the xDS part's mesh.
        #[arg(long, default_value_t = 1_000)]
        xds_policies: usize,
        /// Changes pushed in the xDS part.
        #[arg(long, default_value_t = 100)]
        xds_changes: usize,
        /// Pods of each kind for the CNI figures.
        #[arg(long, default_value_t = 100)]
        pods: usize,
        /// Seconds per throughput and connection-rate measurement, in each round.
        #[arg(long, default_value_t = 1.5)]
        secs: f64,
        /// Rounds of every path, taking turns at going first (rounded up to a multiple of the paths).
        #[arg(long, default_value_t = 6)]
        rounds: usize,
        /// The mesh's ztunnel binary (default: Ambit's, beside the lab's other binaries): the build that ships,
        /// `target/production/ztunnel`, say.
        #[arg(long)]
        mesh_ztunnel: Option<std::path::PathBuf>,
        /// A drop-in peer ztunnel (Istio's, say), measured as a fourth path in the same rounds, on two more
        /// nodes with the same pods and the same control plane.
        #[arg(long)]
        ztunnel: Option<std::path::PathBuf>,
        /// Extra environment for the peer (KEY=VALUE, repeatable).
        #[arg(long = "ztunnel-env")]
        ztunnel_env: Vec<String>,
        /// A sysctl set in the peer's two pods (KEY=VALUE, repeatable), where its ztunnel's sockets live: with
        /// Ambit's own binary as `--ztunnel`, measures a kernel choice against the default in the same rounds.
        #[arg(long = "peer-sysctl")]
        peer_sysctls: Vec<String>,
        /// Run the peer's nodes' agents with `loopbackRoute: false`, so that the apps' redirected sockets in
        /// the peer's pods take the pod interface's MTU: with Ambit's own binary as `--ztunnel`, what that
        /// route gains, in the same rounds.
        #[arg(long)]
        peer_without_lo_route: bool,
        /// Measure only this phase of each round (repeatable; for profiling one): bulk, round-trip, connect,
        /// paced, rate.
        #[arg(long = "phase", value_enum)]
        phases: Vec<lab::bench::Phase>,
        /// Also measure the floor with its two in-pod legs short-cut by an eBPF sockmap (an experiment; loads
        /// BPF programs, which need a kernel with sockmap and a cgroup-v2 mount).
        #[arg(long)]
        sockmap: bool,
        /// Also measure the captured floor: the floor's relays behind the pods' capture rules (the agent's),
        /// where ztunnel would be; what capture adds to the floor.
        #[arg(long)]
        captured_floor: bool,
        /// Also measure the waypoint path: the same pods through a service whose waypoint (the lab's
        /// stand-in, relaying TCP) runs on the server's node; what the extra hop costs.
        #[arg(long)]
        waypoint: bool,
        /// The rate phase's target request rates (repeatable; default 100, 500, 1000, 2000, 4000 and 8000 per
        /// second): open-loop, latency counted from each request's due time.
        #[arg(long = "rate")]
        rates: Vec<f64>,
        /// Connections the rate phase's requests are spread over.
        #[arg(long, default_value_t = 16)]
        rate_connections: usize,
        /// Bytes of each request and answer in the rate phase.
        #[arg(long, default_value_t = 1024)]
        rate_size: usize,
        /// Seconds per rate point and round.
        #[arg(long, default_value_t = 1.0)]
        rate_secs: f64,
        /// The many-clients case of the rate phase: this many connections, one request a second each (0: none).
        #[arg(long, default_value_t = 1000)]
        rate_many: usize,
        /// CPU-bound processes beside the lab for a second pass of the rate phase in every round: each rate
        /// figure is reported quiet and on a busy node.
        #[arg(long, default_value_t = 0)]
        contention: usize,
        /// How long the floor's relays busy-poll after activity, in µs (0: never). With 0, and
        /// `--ztunnel-env AMBIT_BUSY_POLL=0` for Ambit's own binary as `--ztunnel`, the CPU per unit is each
        /// proxy's work without polling.
        #[arg(long, default_value_t = lab::bench::RELAY_SPIN.as_micros() as u64)]
        relay_spin_us: u64,
        /// Leave the CNI lab running afterwards, with its logs.
        #[arg(long)]
        keep: bool,
    },
    /// Churn, traffic and a fault every minute for a while, then check that nothing was lost or leaked and
    /// that only TLS crossed the node link. Exits non-zero if any promise broke.
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Seconds between faults.
        #[arg(long, default_value_t = 60)]
        fault_every: u64,
        /// Churned pods alive at once on each node, at most.
        #[arg(long, default_value_t = 12)]
        pods: usize,
        /// Seed of the run's random choices (to replay one).
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
        /// Print the observations as JSON after the report.
        #[arg(long)]
        json: bool,
    },
    /// Add, remove or list pods on a lab left running (`lab demo --keep`), as a runtime would.
    Pod {
        #[command(subcommand)]
        action: PodAction,
        /// The lab's id (needed only when several are running).
        #[arg(long, global = true)]
        lab: Option<String>,
    },
    /// Many concurrent connections through one node's ztunnel from many enrolled pods (half idle, half moving
    /// data), then all closed: every byte checked, none refused or reset, ztunnel's fds and memory back.
    Load {
        /// Concurrent connections.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Enrolled client pods on node1.
        #[arg(long, default_value_t = 200)]
        pods: usize,
        /// Server pods on node2.
        #[arg(long, default_value_t = 4)]
        servers: usize,
        /// Seconds the connections stay open once all are.
        #[arg(long, default_value_t = 20.0)]
        hold: f64,
        /// Print the report as JSON too.
        #[arg(long)]
        json: bool,
    },
    /// The load's echo server (internal): echoes every connection on LISTEN; prints `ready`.
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// The bench's floor relay (internal): serve ROUTEs (LISTEN=TO) in the current netns; prints `ready`.
    #[command(hide = true)]
    Relay {
        /// LISTEN=TO socket addresses (repeatable).
        #[arg(long = "route", required = true)]
        routes: Vec<lab::relay::Route>,
        /// Take every route's connections on this one address, where the pod's capture rules redirect them,
        /// each by its original destination (a route's LISTEN); the relay's own connections then carry
        /// `--mark`.
        #[arg(long)]
        redirected_at: Option<std::net::SocketAddr>,
        /// The mark on the relay's own connections with `--redirected-at` (ztunnel's, which the rules let
        /// through).
        #[arg(long, default_value_t = 0x539)]
        mark: u32,
        /// Busy-poll for this many µs after activity (0: never).
        #[arg(long, default_value_t = 250)]
        spin_us: u64,
    },
    /// The lab's control plane (internal): istiod's CA and delta xDS on one TLS port; prints `ready`.
    #[command(hide = true)]
    ControlPlane {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        mesh: std::path::PathBuf,
        #[arg(long)]
        pods: Option<std::path::PathBuf>,
        #[arg(long)]
        ca_cert: std::path::PathBuf,
        #[arg(long)]
        ca_key: std::path::PathBuf,
        #[arg(long)]
        serving_cert: std::path::PathBuf,
        #[arg(long)]
        serving_key: std::path::PathBuf,
        #[arg(long)]
        tokens: std::path::PathBuf,
        #[arg(long)]
        faults: std::path::PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Check callers through this API server (TokenReview, pods), as istiod does.
        #[arg(long)]
        kubeconfig: Option<std::path::PathBuf>,
        /// A service account (`namespace/name`) trusted to ask for its node's pods' identities.
        #[arg(long)]
        trusted_node_account: Vec<String>,
    },
    /// A stand-in for Istio's waypoint (internal; see `lab::waypoint`): HBONE on LISTEN as IDENTITY, one L7 rule,
    /// HBONE onwards to the target's endpoint. Certificates come as a ztunnel's do (its environment variables).
    /// Prints `ready`.
    #[command(hide = true)]
    Waypoint {
        #[arg(long, default_value = "[::]:15008")]
        listen: std::net::SocketAddr,
        /// Its SPIFFE identity.
        #[arg(long)]
        identity: String,
        /// The mesh file (Istio ztunnel's local format).
        #[arg(long)]
        mesh: std::path::PathBuf,
        /// Requests whose path starts with this get 403 from the waypoint.
        #[arg(long, default_value = "/admin")]
        deny_prefix: String,
        /// The header added to answers that pass, NAME=VALUE.
        #[arg(long, default_value = "x-waypoint=waypoint")]
        header: String,
        /// Target ports whose traffic is HTTP/1.1 (the rule and the header apply); others are relayed as TCP.
        #[arg(long, value_delimiter = ',', default_value = "80")]
        http_ports: Vec<u16>,
        /// No port is HTTP: every connection is relayed as TCP.
        #[arg(long, conflicts_with = "http_ports")]
        tcp_only: bool,
    },
    /// Remove what killed (or, with --all, kept) labs left behind.
    Clean {
        /// Also remove labs left running with `demo --keep`.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum PodAction {
    /// Create a pod (a netns and the node's CNI chain) and publish it to the mesh.
    Add {
        /// NAMESPACE/NAME (pods in an enrolled namespace, `mesh` in the demo, are captured).
        pod: String,
        /// The node, 1-based.
        #[arg(long, default_value_t = 1)]
        node: usize,
        /// Its service account.
        #[arg(long, default_value = "default")]
        service_account: String,
    },
    /// Delete a pod as a runtime does: CNI DEL, then its netns; and unpublish it.
    Del {
        /// NAMESPACE/NAME.
        pod: String,
    },
    /// List the lab's pods.
    List,
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Demo { keep } => demo(keep),
        Cmd::Waypoint { listen, identity, mesh, deny_prefix, header, http_ports, tcp_only } => {
            let http_ports = if tcp_only { Vec::new() } else { http_ports };
            waypoint(listen, &identity, mesh, deny_prefix, &header, http_ports)
        }
        Cmd::ControlPlane {
            listen,
            mesh,
            pods,
            ca_cert,
            ca_key,
            serving_cert,
            serving_key,
            tokens,
            faults,
            trust_domain,
            kubeconfig,
            trusted_node_account,
        } => {
            let settings = lab::controlplane::Settings {
                listen,
                mesh,
                pods,
                ca: (ca_cert, ca_key),
                serving: (serving_cert, serving_key),
                tokens,
                faults,
                trust_domain,
                kubernetes: kubeconfig.map(|kubeconfig| lab::controlplane::KubeAuth {
                    kubeconfig,
                    trusted_node_accounts: trusted_node_account,
                }),
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            match rt.block_on(lab::controlplane::run(settings)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("control plane: {e:#}");
                    1
                }
            }
        }
        Cmd::Bench {
            json,
            only,
            xds_workloads,
            xds_policies,
            xds_changes,
            pods,
            secs,
            rounds,
            mesh_ztunnel,
            ztunnel,
            ztunnel_env,
            peer_sysctls,
            peer_without_lo_route,
            phases,
            sockmap,
            captured_floor,
            waypoint,
            rates,
            rate_connections,
            rate_size,
            rate_secs,
            rate_many,
            contention,
            relay_spin_us,
            keep,
        } => {
            let pairs = |kvs: &[String]| -> Result<Vec<(String, String)>, String> {
                kvs.iter()
                    .map(|kv| match kv.split_once('=') {
                        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                        _ => Err(format!("{kv:?} is not KEY=VALUE")),
                    })
                    .collect()
            };
            if ztunnel.is_none() && !(ztunnel_env.is_empty() && peer_sysctls.is_empty() && !peer_without_lo_route) {
                eprintln!(
                    "bench: --ztunnel-env, --peer-sysctl and --peer-without-lo-route apply to the peer path: they need --ztunnel"
                );
                std::process::exit(2);
            }
            for (flag, path) in [("--mesh-ztunnel", &mesh_ztunnel), ("--ztunnel", &ztunnel)] {
                if let Some(p) = path.as_ref().filter(|p| !p.is_file()) {
                    eprintln!("bench: {flag} {}: no such file", p.display());
                    std::process::exit(2);
                }
            }
            let (env, peer_sysctls) = match (pairs(&ztunnel_env), pairs(&peer_sysctls)) {
                (Ok(e), Ok(s)) => (e, s),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("bench: {e}");
                    std::process::exit(2);
                }
            };
            let opts = lab::bench::MeshOpts {
                secs,
                rounds,
                mesh_ztunnel,
                peer: ztunnel,
                peer_env: env,
                peer_sysctls,
                peer_without_lo_route,
                phases,
                sockmap,
                captured_floor,
                waypoint,
                rates: if rates.is_empty() { lab::bench::RATES.to_vec() } else { rates },
                rate_connections,
                rate_size,
                rate_secs,
                rate_many,
                contention,
                relay_spin: std::time::Duration::from_micros(relay_spin_us),
                ..Default::default()
            };
            let xds =
                lab::bench_cp::XdsOpts { workloads: xds_workloads, policies: xds_policies, changes: xds_changes, pods };
            bench(json, only.as_deref(), pods, opts, xds, keep)
        }
        Cmd::Relay { routes, redirected_at, mark, spin_us } => match lab::relay::run(
            &routes,
            redirected_at.map(|at| lab::relay::Capture { at, mark }),
            std::time::Duration::from_micros(spin_us),
        ) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("relay: {e:#}");
                1
            }
        },
        Cmd::Soak { minutes, fault_every, pods, seed, json } => {
            let opts = lab::soak::SoakOpts {
                duration: std::time::Duration::from_secs_f64(minutes * 60.0),
                fault_every: std::time::Duration::from_secs(fault_every.max(10)),
                pods_per_node: pods.max(1),
                seed,
                ..Default::default()
            };
            soak(&opts, json)
        }
        Cmd::Pod { action, lab } => pod(action, lab.as_deref()),
        Cmd::Load { connections, pods, servers, hold, json } => {
            let opts = lab::loadgen::LoadOpts {
                connections: connections.max(1),
                pods: pods.max(1),
                servers: servers.max(1),
                hold: std::time::Duration::from_secs_f64(hold.max(0.0)),
                ..Default::default()
            };
            load(&opts, json)
        }
        Cmd::Echo { listen } => match lab::loadgen::serve_echo(listen) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("echo: {e:#}");
                1
            }
        },
        Cmd::Clean { all } => {
            lab::require_root();
            for r in lab::lab::clean_stale(all) {
                println!("removed {r}");
            }
            0
        }
    };
    std::process::exit(code);
}

fn bench(
    json: bool,
    only: Option<&str>,
    pods: usize,
    opts: lab::bench::MeshOpts,
    xds: lab::bench_cp::XdsOpts,
    keep: bool,
) -> i32 {
    lab::require_root();
    lab::lab::clean_stale(false);
    if keep {
        lab::netns::tie_children_to_lab(false);
    }
    let mut progress = |s: &str| {
        if !json {
            println!("{s}");
        }
    };
    let mut out = serde_json::Map::new();
    out.insert("machine".into(), lab::bench::machine());
    if only.is_none_or(|o| o == "mesh") {
        progress(if opts.peer.is_some() {
            "mesh vs direct, the floor and the peer (four nodes: one client and one server pod per ztunnel pair)…"
        } else {
            "mesh vs direct and the floor (two nodes, one client pod, one server pod)…"
        });
        match lab::bench::mesh(&opts, &mut progress) {
            Ok(v) => {
                if let Some(m) = v.as_object() {
                    out.extend(m.clone());
                }
                let r = &v["ratios"];
                progress(&format!(
                    "  mesh against direct: 1-stream throughput {}×, 8 streams {}×, added 1 B round trip p50 {} µs p99 {} µs ({} µs paced {} ms apart), connection rate {}×; ztunnel RSS with 1000 idle connections {} MiB",
                    r["throughput_1"],
                    r["throughput_8"],
                    r["added_rr_1b_us_p50"],
                    r["added_rr_1b_us_p99"],
                    r["added_paced_rr_1b_us_p50"],
                    lab::bench::PACE.as_millis(),
                    r["connect_rate"],
                    v["ztunnel_rss_mib"]["conns_1000"]
                ));
                let f = &v["floor"];
                progress(&format!(
                    "  floor (a bare relay over the same three TCP connections, no TLS or HTTP/2) against direct: 1-stream throughput {}×, 8 streams {}×, added 1 B round trip p50 {} µs p99 {} µs, connection rate {}×",
                    f["throughput_1"],
                    f["throughput_8"],
                    f["added_rr_1b_us_p50"],
                    f["added_rr_1b_us_p99"],
                    f["connect_rate"],
                ));
                let of = &f["mesh_of_floor"];
                progress(&format!(
                    "  mesh against the floor (targets): 1-stream throughput {}× (≥ 0.7), connection rate {}× (≥ 1.0), added 1 B p50 +{} µs over the floor's (≤ 15), CPU per GiB {}× (≤ 1.3), per round trip {}× (≤ 1.0), per paced round trip {}×, per connection {}×; RSS with 1000 idle connections {} MiB (≤ 16)",
                    of["throughput_1"],
                    of["connect_rate"],
                    of["added_rr_1b_us_p50_over_floor"],
                    of["cpu_per_gib"],
                    of["cpu_per_round_trip"],
                    of["cpu_per_paced_round_trip"],
                    of["cpu_per_connection"],
                    v["ztunnel_rss_mib"]["conns_1000"]
                ));
                let c = &v["cpu_per_unit"];
                let cpu = |path: &str| {
                    let c = &c[path];
                    format!(
                        "{} / {} / {} / {}",
                        c["bulk_s_per_gib"], c["round_trip_us"], c["paced_round_trip_us"], c["connection_us"]
                    )
                };
                progress(&format!(
                    "  proxies' CPU per unit (bulk s/GiB, round trip µs, paced round trip µs, connection µs): mesh {}, floor {}",
                    cpu("mesh"),
                    cpu("floor"),
                ));
                let p = &v["peer"];
                if !p.is_null() {
                    let (pr, mp) = (&p["ratios"], &p["mesh_of_peer"]);
                    if let Some(set) = p["sysctls"].as_object().filter(|s| !s.is_empty()) {
                        let set: Vec<String> =
                            set.iter().map(|(k, v)| format!("{k} = {}", v.as_str().unwrap_or(""))).collect();
                        progress(&format!("  the peer's pods ran with {}", set.join(", ")));
                    }
                    progress(&format!(
                        "  peer (same rounds, its own node pair) against direct: 1-stream throughput {}×, 8 streams {}×, added 1 B round trip p50 {} µs p99 {} µs ({} µs paced), connection rate {}×, CPU {}, RSS with 1000 idle connections {} MiB",
                        pr["throughput_1"],
                        pr["throughput_8"],
                        pr["added_rr_1b_us_p50"],
                        pr["added_rr_1b_us_p99"],
                        pr["added_paced_rr_1b_us_p50"],
                        pr["connect_rate"],
                        cpu("peer"),
                        p["rss_mib_conns_1000"],
                    ));
                    progress(&format!(
                        "  Ambit of the peer: 1-stream throughput {}×, 8 streams {}×, 1 B round trip p50 {}× ({}× paced), connection rate {}×, CPU per GiB {}×, per round trip {}×, per paced round trip {}×",
                        mp["throughput_1"],
                        mp["throughput_8"],
                        mp["rr_1b_p50"],
                        mp["paced_rr_1b_p50"],
                        mp["connect_rate"],
                        mp["cpu_per_gib"],
                        mp["cpu_per_round_trip"],
                        mp["cpu_per_paced_round_trip"],
                    ));
                }
            }
            Err(e) => {
                eprintln!("mesh bench failed: {e:#}");
                return 1;
            }
        }
    }
    if only.is_none_or(|o| o == "cni") {
        progress(&format!(
            "CNI: ambit-cni ADD, exec to exit, {pods} enrolled and {pods} passthrough pods on one node…"
        ));
        match lab::bench::cni(pods, keep, &mut progress) {
            Ok(v) => {
                progress(&format!(
                    "  enrolled:     p50 {} ms, p99 {} ms (target p99 ≤ 20 ms)",
                    v["enrol_ms"]["p50"], v["enrol_ms"]["p99"]
                ));
                progress(&format!("  passthrough:  p50 {} ms (target ≤ 3 ms)", v["cni_passthrough_ms"]["p50"]));
                progress(&format!(
                    "  reference:    bridge ADD p50 {} ms in the same runs",
                    v["reference_bridge_add_ms"]["p50"]
                ));
                if let Some(m) = v.as_object() {
                    out.extend(m.clone());
                }
            }
            Err(e) => {
                eprintln!("CNI bench failed: {e:#}");
                return 1;
            }
        }
    }
    if only.is_none_or(|o| o == "xds") {
        progress(&format!(
            "control plane: {} workloads and {} policies over delta xDS, {} changes, {} pods' certificates at once…",
            xds.workloads, xds.policies, xds.changes, xds.pods
        ));
        match lab::bench_cp::xds(&xds, &mut progress) {
            Ok(v) => {
                let (x, c) = (&v["xds"], &v["certificates"]);
                progress(&format!(
                    "  push to in force (control plane sends → slower ztunnel ACKs after applying): initial {} ms; one change p50 {} ms, p99 {} ms; from the file written: p50 {} ms, p99 {} ms",
                    x["initial_push_ms"],
                    x["push_to_in_force_ms"]["p50"],
                    x["push_to_in_force_ms"]["p99"],
                    x["write_to_in_force_ms"]["p50"],
                    x["write_to_in_force_ms"]["p99"]
                ));
                progress(&format!(
                    "  ztunnel RSS: {} MiB before, {} MiB with the mesh",
                    x["ztunnel_rss_mib"]["before"], x["ztunnel_rss_mib"]["after"]
                ));
                progress(&format!(
                    "  certificates: CNI ADD start → certificate issued p50 {} ms, p99 {} ms, max {} ms ({} pods; ambit-cni ADD p50 {} ms)",
                    c["add_to_certificate_ms"]["p50"],
                    c["add_to_certificate_ms"]["p99"],
                    c["add_to_certificate_ms"]["max"],
                    c["pods"],
                    c["ambit_cni_add_ms"]["p50"]
                ));
                if let Some(m) = v.as_object() {
                    out.extend(m.clone());
                }
            }
            Err(e) => {
                eprintln!("control-plane bench failed: {e:#}");
                return 1;
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::Value::Object(out)).unwrap_or_default());
    }
    0
}

fn demo(keep: bool) -> i32 {
    lab::require_root();
    lab::lab::clean_stale(false);
    if keep {
        lab::netns::tie_children_to_lab(false);
    }
    let signals = block_signals();
    let mut out = std::io::stdout();
    let mut lab = match lab::demo::start(&mut out) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lab failed to start: {e:#}");
            return 1;
        }
    };
    teardown_on_signal(signals, lab.id.clone(), lab.dir.clone());
    let pods = match lab::demo::pods(&lab, &mut out) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("creating the demo pods failed: {e:#}\n{}", lab.logs());
            return 1;
        }
    };
    let (server_ns, outsider_ns) = (pods.server.netns.name().to_string(), pods.outsider.netns.name().to_string());
    let (checks, remaining) = lab::demo::run_checks(&lab, pods, &mut out);
    let ok = lab::demo::summary(&checks, &mut out);
    if !ok {
        eprintln!("\ndaemon logs:\n{}", lab.logs());
    }
    if keep {
        lab.keep();
        println!("\nthe lab is still running (directory {}):", lab.dir.display());
        println!("  enter a pod:      ip netns exec {server_ns} bash   (or {outsider_ns})");
        println!("  its rules:        ip netns exec {server_ns} nft list ruleset");
        println!("  ztunnel state:    ip netns exec {} curl -s localhost:15000/config_dump", lab.nodes[1].netns.name());
        println!("  add a pod:        lab pod add mesh/NAME --node 1   (lab pod list, lab pod del mesh/NAME)");
        println!("  logs:             {}/node*/{{agent,ztunnel,cni}}.log, {0}/cp/control-plane.log", lab.dir.display());
        println!("  tear it down:     lab clean --all");
        // Nothing of it is dropped: the pods' netns and the daemons stay until `lab clean --all`.
        std::mem::forget(remaining);
        std::mem::forget(lab);
    }
    if ok { 0 } else { 1 }
}

fn pod(action: PodAction, id: Option<&str>) -> i32 {
    lab::require_root();
    let run = || -> anyhow::Result<()> {
        let lab = lab::Lab::attach(id)?;
        let split = |p: &str| -> anyhow::Result<(String, String)> {
            let (ns, name) = p.split_once('/').ok_or_else(|| anyhow::anyhow!("{p}: expected NAMESPACE/NAME"))?;
            anyhow::ensure!(
                !ns.is_empty() && !name.is_empty() && !name.contains('/') && !ns.contains('_'),
                "{p}: expected NAMESPACE/NAME"
            );
            Ok((ns.to_string(), name.to_string()))
        };
        match action {
            PodAction::Add { pod, node, service_account } => {
                let (ns, name) = split(&pod)?;
                anyhow::ensure!(
                    (1..=lab.nodes.len()).contains(&node),
                    "--node must be between 1 and {}",
                    lab.nodes.len()
                );
                anyhow::ensure!(!lab.pod_names().contains(&pod), "lab {} already has a pod {pod}", lab.id);
                let p = lab.add_pod_as(node - 1, &ns, &name, &service_account).map_err(|e| anyhow::anyhow!("{e}"))?;
                let captured = lab.config.enrolled_namespaces.contains(&ns);
                println!(
                    "{} on node{node}: {} ({})",
                    p.full_name(),
                    p.ip,
                    if captured { "enrolled: captured by Ambit" } else { "not enrolled" }
                );
                println!("  enter it:  ip netns exec {} bash", p.netns.name());
                // The pod lives on after this command, until `lab pod del` or `lab clean --all`.
                std::mem::forget(p);
            }
            PodAction::Del { pod } => {
                let (ns, name) = split(&pod)?;
                let p = lab.find_pod(&ns, &name)?;
                lab.delete_pod(p)?;
                println!("{pod} deleted");
            }
            PodAction::List => {
                for name in lab.pod_names() {
                    let (ns, n) = split(&name)?;
                    let p = lab.find_pod(&ns, &n)?;
                    println!("{name:<30} node{} {:<15} {}", p.node + 1, p.ip, p.netns.name());
                    std::mem::forget(p);
                }
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("lab pod: {e:#}");
            1
        }
    }
}

fn load(opts: &lab::loadgen::LoadOpts, json: bool) -> i32 {
    checked_run(
        "load",
        json,
        |out| lab::loadgen::run(opts, out),
        |r| lab::loadgen::verdict(r),
        |r, broken, out| lab::loadgen::print(r, broken, out),
    )
}

fn soak(opts: &lab::soak::SoakOpts, json: bool) -> i32 {
    checked_run(
        "soak",
        json,
        |out| lab::soak::run(opts, out),
        lab::soak::verdict,
        |o, broken, out| lab::soak::report(o, broken, out),
    )
}

/// Runs a lab tool that observes and then judges (`lab load`, `lab soak`): prints its report (and the
/// observations as JSON if asked); exits 0 only when no promise broke.
fn checked_run<T: serde::Serialize>(
    what: &str,
    json: bool,
    run: impl FnOnce(&mut dyn std::io::Write) -> anyhow::Result<T>,
    judge: impl FnOnce(&mut T) -> Vec<String>,
    report: impl FnOnce(&T, &[String], &mut dyn std::io::Write),
) -> i32 {
    lab::require_root();
    lab::lab::clean_stale(false);
    let mut out = std::io::stdout();
    match run(&mut out) {
        Ok(mut observed) => {
            let broken = judge(&mut observed);
            report(&observed, &broken, &mut out);
            if json {
                println!("{}", serde_json::to_string_pretty(&observed).unwrap_or_default());
            }
            i32::from(!broken.is_empty())
        }
        Err(e) => {
            eprintln!("{what} failed to run: {e:#}");
            1
        }
    }
}

/// Blocks SIGINT and SIGTERM in this thread and every thread started after it, so one thread can wait for them.
fn block_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    let _ = set.thread_block();
    set
}

/// On Ctrl-C or SIGTERM, removes the lab (processes, namespaces, directory) and exits.
fn teardown_on_signal(set: nix::sys::signal::SigSet, id: String, dir: std::path::PathBuf) {
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("\n{sig}: tearing the lab down");
            lab::lab::remove_lab(&id, &dir);
            std::process::exit(130);
        }
    });
}

fn waypoint(
    listen: std::net::SocketAddr,
    identity: &str,
    mesh: std::path::PathBuf,
    deny_prefix: String,
    header: &str,
    http_ports: Vec<u16>,
) -> i32 {
    let run = || -> anyhow::Result<()> {
        let identity = identity.parse().map_err(|e| anyhow::anyhow!("--identity: {e}"))?;
        let (name, value) = header.split_once('=').ok_or_else(|| anyhow::anyhow!("--header: NAME=VALUE"))?;
        let header = (name.to_string(), value.to_string());
        let cfg = ztunnel::config::Config::from_vars(|k| std::env::var(k).ok())?;
        let settings = lab::waypoint::Settings { listen, identity, mesh, deny_prefix, header, http_ports };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(lab::waypoint::run(settings, cfg))
    };
    match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("lab waypoint: {e:#}");
            1
        }
    }
}
