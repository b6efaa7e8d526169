//! Counter-based random streams.
//!
//! Every random number in hyperfunc comes from a stream keyed by a tuple of integers (run seed,
//! generation, pair, parameter…): the key is hashed with SplitMix64 into the seed of a
//! xoshiro256++ generator. Any stream can be regenerated anywhere from its key alone, which is what
//! makes runs reproducible and lets a remote worker rebuild a perturbation from seeds.

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rand_xoshiro::Xoshiro256PlusPlus;

/// One SplitMix64 finalisation step (Steele, Lea & Flood 2014).
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hashes a key tuple into one 64-bit seed; distinct keys give independent-looking seeds.
pub(crate) fn key(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x6A09_E667_F3BC_C909, |h, &p| splitmix64(h ^ splitmix64(p)))
}

/// FNV-1a hash of a name, so a parameter's stream depends on its name, not its position.
pub(crate) fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Fills `out` with standard normals from the stream keyed by `parts`.
pub(crate) fn fill_normals(parts: &[u64], out: &mut [f32]) {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(key(parts));
    for v in out.iter_mut() {
        *v = StandardNormal.sample(&mut rng);
    }
}

/// A vector of `n` standard normals from the stream keyed by `parts`.
pub(crate) fn normals(parts: &[u64], n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    fill_normals(parts, &mut v);
    v
}

/// A uniform value in `[0, 1)` from the stream keyed by `parts` (used for jitter).
pub(crate) fn uniform(parts: &[u64]) -> f64 {
    (key(parts) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_stream_and_different_keys_differ() {
        let a = normals(&[1, 2, 3], 16);
        let b = normals(&[1, 2, 3], 16);
        let c = normals(&[1, 2, 4], 16);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn normals_have_unit_moments() {
        let v = normals(&[7], 100_000);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
