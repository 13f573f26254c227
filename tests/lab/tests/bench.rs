//! `lab bench`'s mesh part, shrunk to seconds: it runs, takes turns between mesh, direct (capture off and on
//! again through ambit-cni) and the floor (bare relays over the mesh's three TCP connections), and prints every
//! figure under its stable key; and its control-plane part (xDS pushes and certificates), shrunk likewise.
//! Needs root.

use lab::bench::{MeshOpts, mesh};
use lab::bench_cp::{XdsOpts, xds};

#[test]
fn mesh_bench_reports_every_figure_under_its_stable_key() {
    // The peer is Ambit's own ztunnel here (any drop-in ztunnel binary will do): what is checked is that it
    // runs as a fourth path of the same rounds, on its own nodes, and reports under its keys.
    let peer = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/ztunnel");
    // The mesh's ztunnel named by another path (as `--mesh-ztunnel target/production/ztunnel` would): the
    // report must name the binary that ran.
    let dir = TempDir(std::env::temp_dir().join(format!("ambit-bench-test-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let mesh_ztunnel = dir.0.join("ztunnel");
    std::os::unix::fs::symlink(lab::util::binary("ztunnel"), &mesh_ztunnel).unwrap();
    let opts = MeshOpts {
        secs: 0.2,
        round_trips: 200,
        paced_round_trips: 40,
        rounds: 2,
        idle_pods: 3,
        idle_conns: 20,
        mesh_ztunnel: Some(mesh_ztunnel.clone()),
        peer: Some(peer.clone()),
        // A kernel choice measured on the peer's pods only; the mesh's keep the default (on).
        peer_sysctls: vec![("net.ipv4.tcp_autocorking".into(), "0".into())],
        // And the capture rules as they were before the loopback route, likewise.
        peer_without_lo_route: true,
        sockmap: true,
        captured_floor: true,
        waypoint: true,
        // The floor's relays poll for less than the default; the JSON reports what they said they do.
        relay_spin: std::time::Duration::from_micros(100),
        // The rate phase shrunk: one point of the sweep, the many-clients case at 50 connections, each quiet
        // and beside one CPU-bound process.
        rates: vec![500.0],
        rate_secs: 0.2,
        rate_many: 50,
        contention: 1,
        ..Default::default()
    };
    let v = mesh(&opts, &mut |_| {}).unwrap();
    let num = |path: &str| -> f64 {
        path.split('.').fold(&v, |v, k| &v[k]).as_f64().unwrap_or_else(|| panic!("no number at {path} in {v:#}"))
    };
    // The sockmap path's bulk runs may fail (see docs/performance.md); that is recorded, and its figures are then null.
    let sockmap_bulk_failed = v["sockmap"]["failures"].as_array().is_some_and(|f| !f.is_empty());
    for side in ["direct", "mesh", "floor", "peer", "sockmap", "captured_floor", "waypoint"] {
        for streams in ["1", "8"].into_iter().filter(|_| side != "sockmap" || !sockmap_bulk_failed) {
            assert!(num(&format!("throughput_gbps.{side}.{streams}")) > 0.0, "{v:#}");
        }
        for size in ["1b", "1k", "paced_1b"] {
            let (p50, p99) =
                (num(&format!("rr_latency_us.{side}.{size}.p50")), num(&format!("rr_latency_us.{side}.{size}.p99")));
            assert!(p50 > 0.0 && p99 >= p50, "{v:#}");
        }
        assert!(num(&format!("connect.{side}.per_s")) > 0.0 && num(&format!("connect.{side}.p50_us")) > 0.0, "{v:#}");
    }
    // The rate phase: each path with proxies or without, each point, quiet and contended.
    let rate = v["rate"].as_array().unwrap_or_else(|| panic!("no rate entries: {v:#}"));
    for path in ["direct", "floor", "mesh", "peer", "captured_floor", "waypoint"] {
        for contention in [0u64, 1] {
            for (target, connections) in [(500.0, 16u64), (50.0, 50)] {
                let e = rate
                    .iter()
                    .find(|e| {
                        e["path"] == path
                            && e["contention"] == contention
                            && e["target_rps"] == target
                            && e["connections"] == connections
                    })
                    .unwrap_or_else(|| panic!("no {path} entry at {target}/s, contention {contention}: {v:#}"));
                let f = |k: &str| k.split('.').fold(e, |v, k| &v[k]).as_f64();
                assert!(f("achieved_rps").is_some_and(|r| r > 0.0), "{e}");
                assert_eq!(e["size"], 1024, "{e}");
                let l: Vec<f64> =
                    ["p50", "p90", "p99", "p999"].iter().map(|p| f(&format!("latency_us.{p}")).unwrap()).collect();
                assert!(l[0] > 0.0 && l.windows(2).all(|w| w[0] <= w[1]), "{e}");
                if path == "direct" {
                    assert!(e["vcpu_per_krps"].is_null() && e["rss_mib"].is_null(), "{e}");
                } else {
                    // A shrunk point may take less than one CPU tick of its proxies.
                    assert!(f("vcpu_per_krps").is_some_and(|c| c >= 0.0), "{e}");
                    for k in ["vcpu_per_krps_user", "vcpu_per_krps_kernel"] {
                        assert!(f(k).is_some_and(|c| c >= 0.0), "{k}: {e}");
                    }
                    assert!(f("rss_mib").is_some_and(|r| r > 0.0), "{e}");
                }
            }
        }
    }
    let of_peer = v["rate_mesh_of_peer"].as_array().unwrap_or_else(|| panic!("no rate_mesh_of_peer: {v:#}"));
    assert_eq!(of_peer.len(), 4, "{v:#}");
    for r in of_peer {
        for k in ["target_rps", "connections", "contention", "vcpu_per_krps", "p50", "p99", "p999", "achieved_rps"] {
            assert!(r.get(k).is_some(), "{k}: {r}");
        }
        assert!(r["p99"].as_f64().is_some_and(|x| x > 0.0), "{r}");
    }
    assert!(v["rate_max_rps_p99_under_10ms"].get("mesh").is_some(), "{v:#}");
    assert_eq!(num("contention"), 1.0);
    assert!(num("ztunnel_rss_mib.idle_100_pods") > 0.0 && num("ztunnel_rss_mib.conns_1000") > 0.0, "{v:#}");
    assert!(num("ztunnel_cpu_s_per_gib") > 0.0, "{v:#}");
    // Rounded up so that each of the seven paths goes first once.
    assert_eq!(num("rounds"), 7.0);
    assert_eq!(num("floor.relay_spin_us"), 100.0, "{v:#}");
    assert_eq!(v["ztunnel_binaries"]["mesh"], mesh_ztunnel.display().to_string(), "{v:#}");
    assert_eq!(v["ztunnel_binaries"]["peer"], peer.display().to_string(), "{v:#}");
    assert_eq!(v["paths"], serde_json::json!(["direct", "relay", "peer", "sockmap", "captured", "waypoint", "mesh"]));
    for ratio in ["throughput_1", "added_rr_1b_us_p50", "connect_rate"] {
        num(&format!("waypoint.of_mesh.{ratio}"));
    }
    for path in ["mesh", "floor", "peer", "sockmap", "captured_floor", "waypoint"] {
        // On the sockmap path the kernel carries an established connection's bytes from socket to socket:
        // ztunnel may spend no CPU tick at all on the round trips, and a share of nothing is null.
        let idle_in_exchanges = |phase: &str| path == "sockmap" && phase.contains("round_trip");
        for unit in ["bulk_s_per_gib", "round_trip_us", "connection_us", "paced_round_trip_us"]
            .into_iter()
            .filter(|u| path != "sockmap" || !sockmap_bulk_failed || *u != "bulk_s_per_gib")
        {
            let cpu = num(&format!("cpu_per_unit.{path}.{unit}"));
            assert!(cpu > 0.0 || (idle_in_exchanges(unit) && cpu == 0.0), "{path} {unit}: {v:#}");
        }
        for phase in ["bulk", "round_trip", "connection", "paced_round_trip"]
            .into_iter()
            .filter(|p| path != "sockmap" || !sockmap_bulk_failed || *p != "bulk")
        {
            let share = &v["cpu_per_unit"][path]["kernel_share"][phase];
            if share.is_null() && idle_in_exchanges(phase) {
                continue;
            }
            let share = num(&format!("cpu_per_unit.{path}.kernel_share.{phase}"));
            assert!((0.0..=1.0).contains(&share), "{path} {phase}: {v:#}");
        }
    }
    for ratio in ["throughput_1", "throughput_8", "added_rr_1b_us_p50", "connect_rate"] {
        num(&format!("peer.ratios.{ratio}"));
    }
    for ratio in [
        "throughput_1",
        "rr_1b_p50",
        "paced_rr_1b_p50",
        "connect_rate",
        "cpu_per_gib",
        "cpu_per_round_trip",
        "cpu_per_paced_round_trip",
    ] {
        assert!(num(&format!("peer.mesh_of_peer.{ratio}")) > 0.0, "{ratio}: {v:#}");
    }
    assert!(num("peer.rss_mib_conns_1000") > 0.0, "{v:#}");
    assert_eq!(v["peer"]["sysctls"], serde_json::json!({"net.ipv4.tcp_autocorking": "0"}), "{v:#}");
    // Through the agent's loopback route, the apps' captured connections have loopback's MSS; without it (the
    // peer's pods here), the pod interface's.
    assert_eq!(v["peer"]["without_lo_route"], true, "{v:#}");
    for (path, big) in [("mesh", true), ("peer", false)] {
        for i in 0..2 {
            let mss = v["peer"]["app_mss"][path][i].as_f64().unwrap_or_else(|| panic!("no MSS {path}.{i}: {v:#}"));
            assert_eq!(mss > 1500.0, big, "{path}'s app MSS {mss}: {v:#}");
        }
    }
    // Where the work goes: a TCP connection with a 1-byte echo is at least seven packets (handshake, byte,
    // echo, two FINs); the mesh carries each connection over more hops than direct, and each exchange too.
    let (direct, mesh) = (num("breakdown.packets_per_connection.direct"), num("breakdown.packets_per_connection.mesh"));
    assert!(direct >= 7.0 && mesh > direct, "{v:#}");
    let (direct, mesh) = (num("breakdown.packets_per_round_trip.direct"), num("breakdown.packets_per_round_trip.mesh"));
    assert!(direct >= 2.0 && mesh >= 2.0 * direct, "{v:#}");
    assert!(num("breakdown.packets_per_mib.mesh") > num("breakdown.packets_per_mib.direct"), "{v:#}");
    assert!(num("breakdown.ztunnel_cpu.bulk_s_per_gib") > 0.0, "{v:#}");
    let share = num("breakdown.ztunnel_cpu.kernel_share.bulk");
    assert!((0.0..=1.0).contains(&share), "{v:#}");
    assert!(num("breakdown.ztunnel_cpu.round_trip_us") >= 0.0 && num("breakdown.ztunnel_cpu.connection_us") >= 0.0);
    for ratio in [
        "throughput_1",
        "throughput_8",
        "added_rr_1b_us_p50",
        "added_rr_1b_us_p99",
        "added_paced_rr_1b_us_p50",
        "connect_rate",
    ] {
        num(&format!("ratios.{ratio}"));
        num(&format!("floor.{ratio}"));
    }
    // The floor's relays are processes of their own, measured like the ztunnels.
    assert!(num("floor.relay_cpu_s_per_gib") > 0.0 && num("floor.relay_cpu_connection_us") > 0.0, "{v:#}");
    // The mesh against the floor, one key per target of the bench.
    for ratio in [
        "throughput_1",
        "throughput_8",
        "connect_rate",
        "cpu_per_gib",
        "cpu_per_round_trip",
        "cpu_per_connection",
        "cpu_per_paced_round_trip",
    ] {
        assert!(num(&format!("floor.mesh_of_floor.{ratio}")) > 0.0, "{ratio}: {v:#}");
    }
    num("floor.mesh_of_floor.added_rr_1b_us_p50_over_floor");
    // The sockmap experiment: the floor's relays with their in-pod legs short-cut, over the floor.
    for ratio in ["connect_rate", "rr_1b_p50"] {
        assert!(num(&format!("sockmap.of_floor.{ratio}")) > 0.0, "{ratio}: {v:#}");
    }
    // Nothing at all when the short-cut spared ztunnel every tick of the round trips (see above).
    assert!(num("sockmap.of_floor.cpu_per_round_trip") >= 0.0, "{v:#}");
    for ratio in ["throughput_1", "throughput_8", "cpu_per_gib"].into_iter().filter(|_| !sockmap_bulk_failed) {
        assert!(num(&format!("sockmap.of_floor.{ratio}")) > 0.0, "{ratio}: {v:#}");
    }
    assert!(num("sockmap.tcp_mem_peak_mib.floor") > 0.0 && num("sockmap.tcp_mem_peak_mib.sockmap") > 0.0, "{v:#}");
    for f in v["sockmap"]["failures"].as_array().into_iter().flatten() {
        assert!(f.as_str().is_some_and(|f| f.contains("Bulk")), "only the bulk phase may fail: {v:#}");
    }
    // The captured floor: the relays behind the agent's capture rules (the bench itself fails if the rules
    // did not send the round trips through them), over the floor, and the mesh over it.
    for ratio in ["throughput_1", "connect_rate", "rr_1b_p50", "cpu_per_round_trip", "cpu_per_connection"] {
        assert!(num(&format!("captured_floor.of_floor.{ratio}")) > 0.0, "{ratio}: {v:#}");
        assert!(num(&format!("captured_floor.mesh_of_captured_floor.{ratio}")) > 0.0, "{ratio}: {v:#}");
    }
    num("captured_floor.of_floor.added_rr_1b_us_p50");
    num("captured_floor.mesh_of_captured_floor.added_rr_1b_us_p50");
    num("captured_floor.ratios.connect_rate");
    assert!(
        num("captured_floor.packets_per_round_trip.captured_floor")
            >= 2.0 * num("breakdown.packets_per_round_trip.direct"),
        "{v:#}"
    );
    assert!(v["sockmap"]["lifts_floor_by_25_percent"].is_boolean(), "{v:#}");
    // It was in effect: the floor's round trip crosses each pod's loopback twice (four packets plus their
    // ACKs), the short-cut one only the node link.
    let (floor, sockmap) = (num("sockmap.packets_per_round_trip.floor"), num("sockmap.packets_per_round_trip.sockmap"));
    assert!(sockmap < floor - 2.0, "the sockmap path sent {sockmap} packets per round trip, the floor {floor}: {v:#}");
}

/// The control-plane part, shrunk: a small mesh, a few changes, a few pods' certificates.
#[test]
fn xds_bench_reports_every_figure_under_its_stable_key() {
    let o = XdsOpts { workloads: 300, policies: 30, changes: 6, pods: 6 };
    let v = xds(&o, &mut |_| {}).unwrap();
    let num = |path: &str| -> f64 {
        path.split('.').fold(&v, |v, k| &v[k]).as_f64().unwrap_or_else(|| panic!("no number at {path} in {v:#}"))
    };
    assert!(num("xds.initial_push_ms") > 0.0 && num("xds.initial_write_to_in_force_ms") >= num("xds.initial_push_ms"));
    for f in ["push_to_in_force_ms", "write_to_in_force_ms"] {
        assert!(num(&format!("xds.{f}.p50")) > 0.0 && num(&format!("xds.{f}.p99")) >= num(&format!("xds.{f}.p50")));
        assert_eq!(num(&format!("xds.{f}.n")), 6.0, "{v:#}");
    }
    assert_eq!(v["xds"]["ztunnel_rss_mib"]["after"].as_array().map(|a| a.len()), Some(2), "{v:#}");
    assert_eq!(num("certificates.pods"), 6.0);
    assert_eq!(num("certificates.add_to_certificate_ms.n"), 6.0, "every pod got its certificate: {v:#}");
    assert!(num("certificates.add_to_certificate_ms.p99") >= num("certificates.add_to_certificate_ms.p50"));
}

/// A directory removed when the test ends, passed or failed.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
