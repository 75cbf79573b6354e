//! The generator's random numbers: SplitMix64, written out so that a seed gives
//! the same sample on every machine and with every version of every crate.

/// A SplitMix64 stream (Steele, Lea and Flood, "Fast splittable pseudorandom
/// number generators", 2014).
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// An independent stream for part `index` of what `seed` generates, so that
    /// patient 7 is the same whether 10 or 100 patients are asked for.
    pub fn derive(seed: u64, stream: &str, index: u64) -> Self {
        let mut rng = Rng::new(seed);
        for byte in stream.bytes() {
            rng.state ^= u64::from(byte);
            rng.next_u64();
        }
        rng.state ^= index;
        rng.next_u64();
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`.
    pub fn range(&mut self, low: i64, high: i64) -> i64 {
        debug_assert!(low <= high);
        let span = (high - low) as u64 + 1;
        low + (self.next_u64() % span) as i64
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A value near `mean`, spread evenly up to `spread` either side.
    pub fn around(&mut self, mean: f64, spread: f64) -> f64 {
        mean + (self.unit() * 2.0 - 1.0) * spread
    }

    pub fn chance(&mut self, probability: f64) -> bool {
        self.unit() < probability
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next_u64() % items.len() as u64) as usize]
    }

    /// A random (version 4 layout) UUID, used as a resource id.
    pub fn uuid(&mut self) -> String {
        let (a, b) = (self.next_u64(), self.next_u64());
        let a = (a & 0xFFFF_FFFF_FFFF_0FFF) | 0x4000;
        let b = (b & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xFFFF,
            a & 0xFFFF,
            b >> 48,
            b & 0xFFFF_FFFF_FFFF
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_splitmix64() {
        // The first outputs for seed 0 as the algorithm's reference gives them.
        let mut rng = Rng::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn uuids_have_the_version_4_layout() {
        let mut rng = Rng::new(9);
        let id = rng.uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }

    #[test]
    fn derived_streams_differ_by_name_and_index() {
        let a = Rng::derive(1, "patient", 0).next_u64();
        assert_ne!(a, Rng::derive(1, "patient", 1).next_u64());
        assert_ne!(a, Rng::derive(1, "practitioner", 0).next_u64());
        assert_ne!(a, Rng::derive(2, "patient", 0).next_u64());
        assert_eq!(a, Rng::derive(1, "patient", 0).next_u64());
    }
}
