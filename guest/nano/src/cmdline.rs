// SPDX-License-Identifier: Apache-2.0
//! The nano guest's view of the kernel command line: where it is in the Linux
//! `boot_params` (zero page), and the `cell0.*` keys it understands.

/// Offset in `boot_params` of `ext_cmd_line_ptr` (high 32 bits of the address).
pub const BP_EXT_CMD_LINE_PTR: usize = 0xc8;
/// Offset in `boot_params` of `hdr.cmd_line_ptr` (low 32 bits of the address).
pub const BP_CMD_LINE_PTR: usize = 0x228;
/// Offset in `boot_params` of `hdr.cmdline_size` (maximum length, without NUL).
pub const BP_CMDLINE_SIZE: usize = 0x238;
/// Bytes read at most when `cmdline_size` is zero (an old boot protocol).
pub const DEFAULT_CMDLINE_MAX: usize = 2048;

/// The guest-physical address of the cmdline from the two pointer fields.
pub const fn cmdline_address(cmd_line_ptr: u32, ext_cmd_line_ptr: u32) -> u64 {
    ((ext_cmd_line_ptr as u64) << 32) | cmd_line_ptr as u64
}

/// What the nano guest was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options<'a> {
    /// `cell0.test=NAME`: the self-test to run (the last one given wins).
    pub test: Option<&'a [u8]>,
    /// `cell0.cpus=N`: the number of vCPUs the VMM started (1 when absent).
    pub cpus: usize,
}

/// A cmdline the nano guest cannot run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<'a> {
    /// `cell0.cpus=` is not a decimal number from 1 to `max`.
    BadCpus {
        /// The value as given.
        value: &'a [u8],
        /// The largest accepted count.
        max: usize,
    },
}

/// Parses the `cell0.*` keys of a cmdline (space- or tab-separated tokens;
/// unknown tokens are ignored, so Linux parameters may sit beside them).
pub fn parse(cmdline: &[u8], max_cpus: usize) -> Result<Options<'_>, Error<'_>> {
    let mut opts = Options {
        test: None,
        cpus: 1,
    };
    for token in cmdline.split(|b| *b == b' ' || *b == b'\t' || *b == b'\n') {
        if let Some(name) = token.strip_prefix(b"cell0.test=") {
            opts.test = Some(name);
        } else if let Some(value) = token.strip_prefix(b"cell0.cpus=") {
            opts.cpus = match parse_decimal(value) {
                Some(n) if n >= 1 && n <= max_cpus => n,
                _ => {
                    return Err(Error::BadCpus {
                        value,
                        max: max_cpus,
                    });
                }
            };
        }
    }
    Ok(opts)
}

/// A decimal `usize` without sign or separators; `None` when empty, not a
/// number or too large.
pub fn parse_decimal(s: &[u8]) -> Option<usize> {
    if s.is_empty() {
        return None;
    }
    let mut n: usize = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(usize::from(b - b'0'))?;
    }
    Some(n)
}

/// The cmdline's tokens (separated by spaces, tabs or newlines), empty ones skipped.
pub fn tokens(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline
        .split(|b| *b == b' ' || *b == b'\t' || *b == b'\n')
        .filter(|t| !t.is_empty())
}

/// The value of the last `KEY=VALUE` token whose key is `key`.
pub fn value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    tokens(cmdline)
        .filter_map(|t| t.strip_prefix(key).and_then(|rest| rest.strip_prefix(b"=")))
        .last()
}

/// A number: decimal, or hexadecimal after `0x`/`0X`; `None` when empty, not
/// a number or above `u64::MAX`.
pub fn parse_number(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in digits {
        let d = char::from(b).to_digit(radix)?;
        n = n.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(n)
}

/// A size as Linux's `memparse` reads it: a number (see [`parse_number`])
/// with an optional suffix K, M, G or T (either case, powers of 1024).
pub fn parse_memsize(s: &[u8]) -> Option<u64> {
    let (num, shift) = match s.last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        Some(b't' | b'T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    // A hex number may end in what looks like a suffix only if it has no
    // `0x`; "0x1G" is a hex 1 with a suffix, "0x1b" is 27.
    let n = parse_number(num)?;
    n.checked_mul(1u64 << shift)
}

/// A virtio-mmio device from a `virtio_mmio.device=SIZE@BASE:IRQ[:ID]` token
/// (the format Linux's virtio_mmio driver reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of its register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its interrupt line (IOAPIC input).
    pub irq: u32,
}

/// The cmdline key that announces a virtio-mmio device.
pub const VIRTIO_MMIO_KEY: &[u8] = b"virtio_mmio.device";

/// Parses the value of a `virtio_mmio.device=` token.
pub fn parse_mmio_device(v: &[u8]) -> Option<MmioDevice> {
    let at = v.iter().position(|b| *b == b'@')?;
    let size = parse_memsize(&v[..at])?;
    let mut rest = v[at + 1..].split(|b| *b == b':');
    let base = parse_memsize(rest.next()?)?;
    let irq = u32::try_from(parse_number(rest.next()?)?).ok()?;
    if let Some(id) = rest.next() {
        parse_number(id)?;
    }
    if rest.next().is_some() || size == 0 || base.checked_add(size).is_none() {
        return None;
    }
    Some(MmioDevice { base, size, irq })
}

/// Every `virtio_mmio.device=` entry in cmdline order: `Ok` with the device,
/// or `Err` with the value that does not parse.
pub fn mmio_devices(cmdline: &[u8]) -> impl Iterator<Item = Result<MmioDevice, &[u8]>> {
    tokens(cmdline).filter_map(|t| {
        let v = t.strip_prefix(VIRTIO_MMIO_KEY)?.strip_prefix(b"=")?;
        Some(parse_mmio_device(v).ok_or(v))
    })
}

/// A comma-separated list of numbers (see [`parse_number`]); `None` if any
/// item is empty or not a number. At most `out.len()` items; `None` beyond.
pub fn parse_list(s: &[u8], out: &mut [u64]) -> Option<usize> {
    let mut n = 0;
    for item in s.split(|b| *b == b',') {
        *out.get_mut(n)? = parse_number(item)?;
        n += 1;
    }
    Some(n)
}

/// Decodes base64 in the URL-safe alphabet that `cell0d token mint`
/// (biscuit's `to_base64`) prints, or the standard one, padded or not;
/// `None` when it is neither.
pub fn parse_base64(s: &[u8]) -> Option<alloc::vec::Vec<u8>> {
    use base64::Engine as _;
    use base64::alphabet::{STANDARD, URL_SAFE};
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const URL: GeneralPurpose = GeneralPurpose::new(&URL_SAFE, CONFIG);
    const STD: GeneralPurpose = GeneralPurpose::new(&STANDARD, CONFIG);
    URL.decode(s).or_else(|_| STD.decode(s)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_cmdline_means_no_test_one_cpu() {
        assert_eq!(
            parse(b"", 16),
            Ok(Options {
                test: None,
                cpus: 1
            })
        );
    }

    #[test]
    fn finds_test_and_cpus_among_other_tokens() {
        let o = parse(
            b"console=ttyS0 cell0.test=smp  virtio_mmio.device=4K@0xd0000000:5 cell0.cpus=2",
            16,
        )
        .unwrap();
        assert_eq!(o.test, Some(&b"smp"[..]));
        assert_eq!(o.cpus, 2);
    }

    #[test]
    fn last_test_wins_and_empty_name_is_kept() {
        assert_eq!(
            parse(b"cell0.test=a cell0.test=b", 16).unwrap().test,
            Some(&b"b"[..])
        );
        assert_eq!(parse(b"cell0.test=", 16).unwrap().test, Some(&b""[..]));
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        for bad in [
            &b"cell0.cpus=0"[..],
            b"cell0.cpus=17",
            b"cell0.cpus=x",
            b"cell0.cpus=",
            b"cell0.cpus=-1",
        ] {
            assert!(
                matches!(parse(bad, 16), Err(Error::BadCpus { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(parse(b"cell0.cpus=16", 16).unwrap().cpus, 16);
    }

    #[test]
    fn decimal_overflow_is_none() {
        assert_eq!(parse_decimal(b"99999999999999999999999"), None);
        assert_eq!(parse_decimal(b"42"), Some(42));
    }

    #[test]
    fn address_combines_both_halves() {
        assert_eq!(cmdline_address(0x2_0000, 0), 0x2_0000);
        assert_eq!(cmdline_address(0x1000, 1), 0x1_0000_1000);
    }
    #[test]
    fn value_takes_the_last_exact_key() {
        let c = b"cell0.port=1 cell0.portx=9 cell0.port=2 cell0.port";
        assert_eq!(value(c, b"cell0.port"), Some(&b"2"[..]));
        assert_eq!(value(c, b"cell0.size"), None);
        assert_eq!(value(b"cell0.token=", b"cell0.token"), Some(&b""[..]));
    }

    #[test]
    fn numbers_and_sizes() {
        assert_eq!(parse_number(b"0"), Some(0));
        assert_eq!(parse_number(b"1024"), Some(1024));
        assert_eq!(parse_number(b"0xd0000000"), Some(0xd000_0000));
        assert_eq!(parse_number(b"0XfF"), Some(255));
        assert_eq!(parse_number(b"0x"), None);
        assert_eq!(parse_number(b"12a"), None);
        assert_eq!(parse_number(b"18446744073709551616"), None);
        assert_eq!(parse_memsize(b"4K"), Some(4096));
        assert_eq!(parse_memsize(b"4k"), Some(4096));
        assert_eq!(parse_memsize(b"2M"), Some(2 << 20));
        assert_eq!(parse_memsize(b"0x1000"), Some(4096));
        assert_eq!(parse_memsize(b"1G"), Some(1 << 30));
        assert_eq!(parse_memsize(b"K"), None);
        assert_eq!(parse_memsize(b"0xffffffffffffffffK"), None);
    }

    #[test]
    fn virtio_mmio_devices_are_found_in_order() {
        let c = b"console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 cell0.test=x \
                  virtio_mmio.device=0x1000@0xd0001000:6:2 virtio_mmio.device=4K@oops:7";
        let d: Vec<_> = mmio_devices(c).collect();
        assert_eq!(
            d,
            vec![
                Ok(MmioDevice {
                    base: 0xd000_0000,
                    size: 4096,
                    irq: 5
                }),
                Ok(MmioDevice {
                    base: 0xd000_1000,
                    size: 4096,
                    irq: 6
                }),
                Err(&b"4K@oops:7"[..]),
            ]
        );
        assert_eq!(mmio_devices(b"cell0.test=smp").count(), 0);
    }

    #[test]
    fn malformed_virtio_mmio_values_are_rejected() {
        for bad in [
            &b""[..],
            b"4K",
            b"4K@0xd0000000",
            b"4K@0xd0000000:",
            b"4K@0xd0000000:x",
            b"0@0xd0000000:5",
            b"4K@0xd0000000:5:1:2",
            b"4K@0xd0000000:5:",
            b"4K@0xfffffffffffff000:5",
            b"4K@0xd0000000:4294967296",
        ] {
            assert_eq!(
                parse_mmio_device(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn tokens_are_base64_in_either_alphabet() {
        assert_eq!(
            parse_base64(b"aGk_-w=="),
            Some(vec![b'h', b'i', 0x3f, 0xfb])
        );
        assert_eq!(parse_base64(b"aGk_-w"), Some(vec![b'h', b'i', 0x3f, 0xfb]));
        assert_eq!(
            parse_base64(b"aGk/+w=="),
            Some(vec![b'h', b'i', 0x3f, 0xfb])
        );
        assert_eq!(parse_base64(b""), Some(vec![]));
        assert_eq!(parse_base64(b"a?b"), None);
        assert_eq!(parse_base64(b"aGk_+w=="), None);
    }

    #[test]
    fn lists_parse_or_fail_whole() {
        let mut out = [0u64; 5];
        assert_eq!(parse_list(b"0,1,4096,65536,1048576", &mut out), Some(5));
        assert_eq!(out, [0, 1, 4096, 65536, 1_048_576]);
        assert_eq!(parse_list(b"7", &mut out), Some(1));
        assert_eq!(parse_list(b"1,,2", &mut out), None);
        assert_eq!(parse_list(b"", &mut out), None);
        assert_eq!(parse_list(b"1,2,3,4,5,6", &mut out), None);
    }
}
