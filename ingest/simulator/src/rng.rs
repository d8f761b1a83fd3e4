//! Deterministic randomness and identifiers. Everything the simulator draws comes from here, seeded
//! by hashing `(seed, user, what, date…)`, so a person's day is the same whatever `now`, `days` or
//! the number of users is (only the cut-off at `now` moves). Hand-written (SplitMix64 + FNV-1a)
//! rather than `rand`, so the stream is fixed by this file and not by a dependency's version.

/// SplitMix64's finaliser: a bijection on `u64` with good avalanche.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hashes a seed and a list of byte strings (each part delimited, so `["ab","c"] != ["a","bc"]`).
pub(crate) fn hash(seed: u64, parts: &[&[u8]]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ mix64(seed);
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        h ^= 0xff;
        h = h.wrapping_mul(PRIME);
    }
    mix64(h)
}

/// A small, fast, portable PRNG (SplitMix64).
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    state: u64,
}

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub(crate) fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in `lo..=hi`.
    pub(crate) fn int(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + (self.next_u64() % ((hi - lo + 1) as u64)) as i64
    }

    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Normal distribution (Box–Muller).
    pub(crate) fn normal(&mut self, mean: f64, sd: f64) -> f64 {
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub(crate) fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.int(0, xs.len() as i64 - 1) as usize]
    }
}

/// A UUID-shaped identifier (HealthKit style, upper case). `lo` is kept whole, so identifiers that
/// share `hi` are distinct exactly when their `lo` are.
pub(crate) fn uuid_like(hi: u64, lo: u64) -> String {
    format!("{:08X}-{:04X}-4{:03X}-{:04X}-{:012X}", hi >> 32, (hi >> 16) & 0xffff, hi & 0xfff, lo >> 48, lo & 0xffff_ffff_ffff)
}

/// A unique identifier of `counter` within the namespace `(seed, user, namespace)`: distinct
/// counters always give distinct strings (`mix64` is a bijection).
pub(crate) fn unique_id(seed: u64, user: &str, namespace: &str, counter: u64) -> String {
    let hi = hash(seed, &[user.as_bytes(), namespace.as_bytes()]);
    let lo = mix64(counter ^ hash(seed, &[user.as_bytes(), namespace.as_bytes(), b"lo"]));
    uuid_like(hi, lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulate_rng_is_stable_and_in_range() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..1000 {
            let x = a.range(2.0, 3.0);
            assert_eq!(x, b.range(2.0, 3.0));
            assert!((2.0..3.0).contains(&x));
            let i = a.int(-3, 3);
            b.int(-3, 3);
            assert!((-3..=3).contains(&i));
        }
        assert_ne!(hash(1, &[b"ab", b"c"]), hash(1, &[b"a", b"bc"]));
        assert_ne!(unique_id(1, "u", "n", 1), unique_id(1, "u", "n", 2));
        assert_eq!(unique_id(1, "u", "n", 1).len(), 36);
    }
}
