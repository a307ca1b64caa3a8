//! Timing helpers shared by the benchmarks.

use std::time::Instant;

/// The median of `v` (the mean of the middle two for an even count; 0 for none).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median over `samples` samples of the ns per iteration of `f(iters)`, a call that does
/// `iters` iterations; one untimed call first warms caches and allocators.
pub fn ns_per_iter(iters: u64, samples: usize, mut f: impl FnMut(u64)) -> f64 {
    f(iters);
    let v: Vec<f64> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            f(iters);
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    median(&v)
}
