// SPDX-License-Identifier: Apache-2.0
//! The deterministic payloads the SYPAS self-tests send: byte `i` of call `k`
//! is `(i mod 251) XOR (k mod 256)`. 251 is prime, so a reply shifted by any
//! whole number of bytes up to 250 differs; the XOR tells calls apart.

/// Byte `i` of the payload of call `k`.
pub const fn byte(i: usize, k: u32) -> u8 {
    ((i % 251) as u8) ^ (k as u8)
}

/// Bytes in one period of the pattern.
pub const PERIOD: usize = 251;

/// One period of call `k`'s payload.
fn period(k: u32) -> [u8; PERIOD] {
    let mut p = [0u8; PERIOD];
    for (i, b) in p.iter_mut().enumerate() {
        *b = byte(i, k);
    }
    p
}

/// Fills `buf` with the payload of call `k` (a period at a time).
pub fn fill(buf: &mut [u8], k: u32) {
    let p = period(k);
    for chunk in buf.chunks_mut(PERIOD) {
        chunk.copy_from_slice(&p[..chunk.len()]);
    }
}

/// The first index where `got` differs from `want`, or the shorter length
/// when one is a prefix of the other; `None` when they are equal.
pub fn first_difference(want: &[u8], got: &[u8]) -> Option<usize> {
    if want == got {
        return None;
    }
    Some(
        want.iter()
            .zip(got)
            .position(|(a, b)| a != b)
            .unwrap_or(want.len().min(got.len())),
    )
}

/// The first index where `got` differs from the `len`-byte payload of call
/// `k` (or the shorter length, if one is a prefix of the other); `None` when
/// they are equal. Compares a period at a time, without building the
/// expected payload.
pub fn first_difference_from(got: &[u8], len: usize, k: u32) -> Option<usize> {
    let p = period(k);
    let n = got.len().min(len);
    for (c, chunk) in got[..n].chunks(PERIOD).enumerate() {
        let want = &p[..chunk.len()];
        if chunk != want {
            let at = chunk
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Some(c * PERIOD + at);
        }
    }
    (got.len() != len).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_matches_the_formula() {
        let mut b = vec![0u8; 1000];
        fill(&mut b, 300);
        for (i, v) in b.iter().enumerate() {
            assert_eq!(*v, byte(i, 300));
        }
        assert_eq!(byte(0, 0), 0);
        assert_eq!(byte(251, 0), 0);
        assert_eq!(byte(250, 1), 251);
    }

    #[test]
    fn shifted_or_foreign_payloads_differ() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        fill(&mut a, 1);
        fill(&mut b, 2);
        assert_eq!(first_difference(&a, &b), Some(0));
        assert_eq!(first_difference(&a, &a[1..]), Some(0));
        assert_eq!(first_difference(&a, &a), None);
        assert_eq!(first_difference(&a, &a[..10]), Some(10));
        let mut c = a.clone();
        c[4000] ^= 1;
        assert_eq!(first_difference(&a, &c), Some(4000));
        assert_eq!(first_difference_from(&a, 4096, 1), None);
        assert_eq!(first_difference_from(&c, 4096, 1), Some(4000));
        assert_eq!(first_difference_from(&b, 4096, 1), Some(0));
        assert_eq!(first_difference_from(&a[..10], 4096, 1), Some(10));
        assert_eq!(first_difference_from(&a, 10, 1), Some(10));
        assert_eq!(first_difference_from(&[], 0, 9), None);
    }
}
