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
}
