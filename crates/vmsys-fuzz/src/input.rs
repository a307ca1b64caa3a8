//! A byte string read as a stream of choices. Reading past the end yields zeroes, so every
//! input (the empty one too) is a valid, finite program.

pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    /// Whether every byte has been consumed.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = (v << 8) | u64::from(self.u8());
        }
        v
    }

    /// True once in `n` times (`n > 0`).
    pub fn one_in(&mut self, n: u8) -> bool {
        self.u8().is_multiple_of(n)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        if n <= 256 {
            u64::from(self.u8()) % n
        } else {
            self.u64() % n
        }
    }

    /// Mostly small values, sometimes a raw 64-bit one (the edges are where arithmetic breaks).
    pub fn size(&mut self, small: u64) -> u64 {
        match self.u8() % 8 {
            0 => self.u64(),
            1 => u64::MAX - self.below(small.max(1)),
            _ => self.below(small.max(1)),
        }
    }
}
