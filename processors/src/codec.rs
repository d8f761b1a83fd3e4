//! The pieces of the processors' compact binary state values: LEB128 varints, zigzag signed
//! integers, length-prefixed strings, and a reader that refuses truncated or malformed input
//! with an error (it never panics, whatever the bytes).

use vitals_schemas::SourceKind;

/// Writes a value.
pub(crate) struct W(pub(crate) Vec<u8>);

impl W {
    pub(crate) fn u(&mut self, mut x: u64) {
        loop {
            let b = (x & 0x7f) as u8;
            x >>= 7;
            if x == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    pub(crate) fn i(&mut self, x: i64) {
        self.u(((x << 1) ^ (x >> 63)) as u64);
    }
    pub(crate) fn s(&mut self, s: &str) {
        self.u(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
}

/// Reads a value: every method fails on bytes that are missing or malformed.
pub(crate) struct R<'a>(pub(crate) &'a [u8]);

impl<'a> R<'a> {
    pub(crate) fn byte(&mut self) -> Result<u8, String> {
        let (&b, rest) = self.0.split_first().ok_or("truncated")?;
        self.0 = rest;
        Ok(b)
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(a)
    }
    pub(crate) fn u(&mut self) -> Result<u64, String> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            x |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err("varint too long".into())
    }
    pub(crate) fn i(&mut self) -> Result<i64, String> {
        let z = self.u()?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }
    pub(crate) fn s(&mut self) -> Result<&'a str, String> {
        let n = usize::try_from(self.u()?).map_err(|e| e.to_string())?;
        std::str::from_utf8(self.take(n)?).map_err(|e| e.to_string())
    }
    /// Fails unless every byte was read.
    pub(crate) fn end(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes".into())
        }
    }
}

/// A source kind as one byte.
pub(crate) fn kind_code(k: SourceKind) -> u8 {
    match k {
        SourceKind::Manual => 0,
        SourceKind::Watch => 1,
        SourceKind::Phone => 2,
        SourceKind::ThirdParty => 3,
    }
}

pub(crate) fn kind_of(c: u8) -> Result<SourceKind, String> {
    Ok(match c {
        0 => SourceKind::Manual,
        1 => SourceKind::Watch,
        2 => SourceKind::Phone,
        3 => SourceKind::ThirdParty,
        _ => return Err(format!("source kind {c}")),
    })
}
