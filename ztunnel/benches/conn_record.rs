//! The metrics work of one proxied connection (open and close of its record: Istio's `istio_tcp_*` counters),
//! for issue 16's "label sets built once per peer pair". Prints nanoseconds per connection for a known pair
//! (the cache), a new pair each time, and the reference: labels built at open and at close, as before the
//! cache. Rounds alternate the three, so a busy moment of the machine falls on all of them.
//!
//! `cargo bench -p ztunnel --bench conn_record`

use ztunnel::{BenchVariant, bench_conn_records};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    const N: usize = 100_000;
    const ROUNDS: usize = 7;
    let variants = [BenchVariant::KnownPair, BenchVariant::NewPair, BenchVariant::LabelsPerConnection];
    let mut ns = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (i, v) in variants.iter().enumerate() {
            ns[i].push(bench_conn_records(N, *v));
        }
    }
    let [known, new, reference] = ns.map(|mut v| median(&mut v));
    println!("metrics work per connection, median of {ROUNDS} rounds of {N}:");
    println!("  known pair (cached counters):        {known:7.0} ns");
    println!("  new pair each time (labels built):   {new:7.0} ns");
    println!("  reference, labels built twice:      {reference:7.0} ns");
    println!("  known pair / reference: {:.2}x", known / reference);
}
