//! The data path's own work per unit, in one process on one thread (see `ztunnel::proxy::bench`): a 1-byte
//! round trip and a GiB of bulk on three paths between the same client and server — direct, two bare relays
//! (the lab bench's floor, without its netns and netfilter), and ztunnel's two HBONE sides (mTLS, HTTP/2,
//! ztunnel's copies). Rounds alternate the paths, so a busy moment of the machine falls on all of them; the
//! thread's CPU time counts only this process's work. Prints medians and the ratios of hbone to relay: what
//! TLS, HTTP/2 and their copies cost, the part of the gap to the floor that is ztunnel's own. Also cold round
//! trips, each after a read that pushes the previous one's data out of the core's L1d and L2 caches, as other
//! processes do between a ztunnel's passes in the lab.
//!
//! `cargo bench -p ztunnel --bench data_path` (add `-- hbone`, `-- relay` or `-- direct` to run one path
//! alone, for profiling it).

use ztunnel::{DataPath, bench_data_path};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    const ROUND_TRIPS: usize = 20_000;
    const BULK: u64 = 1 << 30;
    const ROUNDS: usize = 5;
    let paths = [DataPath::Direct, DataPath::Relay, DataPath::Hbone];
    let names = ["direct", "relay", "hbone"];
    // `cargo bench` passes `--bench`; a path's name runs that one alone.
    if let Some(i) = std::env::args().skip(1).find_map(|a| names.iter().position(|n| *n == a)) {
        let c = bench_data_path(paths[i], ROUND_TRIPS, 4 * BULK).expect("the path carries its bytes");
        println!(
            "{}: {:.1} µs per 1 B round trip ({:.1} of it in user space; {:.1} cold), {:.3} s per GiB",
            names[i], c.round_trip_us, c.round_trip_user_us, c.cold_round_trip_us, c.bulk_s_per_gib
        );
        return;
    }
    let (mut rt, mut user, mut cold, mut bulk) =
        ([vec![], vec![], vec![]], [vec![], vec![], vec![]], [vec![], vec![], vec![]], [vec![], vec![], vec![]]);
    for round in 0..ROUNDS {
        for i in 0..paths.len() {
            // Each path goes first in turn.
            let i = (i + round) % paths.len();
            let c = bench_data_path(paths[i], ROUND_TRIPS, BULK).expect("the path carries its bytes");
            rt[i].push(c.round_trip_us);
            user[i].push(c.round_trip_user_us);
            cold[i].push(c.cold_round_trip_us);
            bulk[i].push(c.bulk_s_per_gib);
        }
    }
    let range = |v: &[f64]| (v.iter().copied().fold(f64::MAX, f64::min), v.iter().copied().fold(0.0, f64::max));
    let (rt_range, bulk_range) = (rt.each_ref().map(|v| range(v)), bulk.each_ref().map(|v| range(v)));
    let cold_range = cold.each_ref().map(|v| range(v));
    let rt = rt.map(median);
    let user = user.map(median);
    let cold = cold.map(median);
    let bulk = bulk.map(median);
    println!(
        "CPU per unit, one thread, medians [and ranges] of {ROUNDS} rounds ({ROUND_TRIPS} round trips, 1 GiB each):"
    );
    println!("  {:8} {:>28} {:>12} {:>28} {:>30}", "path", "1 B round trip", "(user)", "cold 1 B round trip", "bulk");
    for (i, name) in names.iter().enumerate() {
        let ((rl, rh), (cl, ch), (bl, bh)) = (rt_range[i], cold_range[i], bulk_range[i]);
        println!(
            "  {name:8} {:>6.1} µs [{rl:5.1}–{rh:5.1}] {:>9.1} µs {:>6.1} µs [{cl:5.1}–{ch:5.1}] {:>8.3} s/GiB [{bl:.3}–{bh:.3}]",
            rt[i], user[i], cold[i], bulk[i]
        );
    }
    println!(
        "  hbone / relay: {:.2}x per round trip (+{:.1} µs), {:.2}x per GiB (+{:.3} s)",
        rt[2] / rt[1],
        rt[2] - rt[1],
        bulk[2] / bulk[1],
        bulk[2] - bulk[1]
    );
    println!("  user space per round trip: hbone − relay +{:.1} µs", user[2] - user[1]);
    println!(
        "  cold round trips (caches holding other work, see ztunnel::proxy::bench): hbone / relay {:.2}x (+{:.1} µs)",
        cold[2] / cold[1],
        cold[2] - cold[1]
    );
}
