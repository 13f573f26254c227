//! What TLS costs the bulk path per GiB, apart from the kernel: for issue 16's "find the remaining cost per
//! GiB". HBONE's records are TLS 1.3 AES-128-GCM (ring, the suite ztunnel prefers) of up to 16 KiB; every
//! byte is sealed once by the client's ztunnel and opened once by the server's. Prints, per GiB, the seconds
//! of one seal plus one open in place (the crypto alone), of one 16 KiB copy hot in cache (a lower bound of
//! what a record costs each time it moves between buffers: the proxy's copies miss the cache), and the sum
//! with the two copies the current path makes (rustls copies a record in when sealing and out when opening).
//!
//! `cargo bench -p ztunnel --bench record_crypto`

use std::time::Instant;

use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

const RECORD: usize = 16 * 1024;
const GIB: f64 = (1u64 << 30) as f64;

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seconds per GiB of sealing and then opening `n` records in place.
fn seal_open(key: &LessSafeKey, n: usize) -> f64 {
    let mut record = vec![0x5au8; RECORD];
    let start = Instant::now();
    for seq in 0..n as u64 {
        let tag = key.seal_in_place_separate_tag(nonce(seq), Aad::from([23u8, 3, 3, 0x40, 0x11]), &mut record).unwrap();
        record.extend_from_slice(tag.as_ref());
        key.open_in_place(nonce(seq), Aad::from([23u8, 3, 3, 0x40, 0x11]), &mut record).unwrap();
        record.truncate(RECORD);
    }
    start.elapsed().as_secs_f64() / (n * RECORD) as f64 * GIB
}

/// Seconds per GiB of copying `n` records from one buffer to another.
fn copy(n: usize) -> f64 {
    let (from, mut to) = (vec![0x5au8; RECORD], vec![0u8; RECORD]);
    let start = Instant::now();
    for i in 0..n {
        to.copy_from_slice(std::hint::black_box(&from));
        std::hint::black_box(&mut to)[i % RECORD] ^= 1;
    }
    start.elapsed().as_secs_f64() / (n * RECORD) as f64 * GIB
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    const N: usize = 64 * 1024; // 1 GiB of records per round
    const ROUNDS: usize = 5;
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());
    let (mut crypto, mut copies) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        crypto.push(seal_open(&key, N));
        copies.push(copy(N));
    }
    let (crypto, copy) = (median(crypto), median(copies));
    println!("per GiB of HBONE payload, median of {ROUNDS} rounds of 1 GiB, one core:");
    println!("  AES-128-GCM seal + open in place:   {crypto:.3} s");
    println!("  one 16 KiB record copy, hot in cache: {copy:.3} s");
    println!("  seal + open + two such copies (a lower bound of the TLS layer's work): {:.3} s", crypto + 2.0 * copy);
}
