// SPDX-License-Identifier: Apache-2.0
//! Printing bytes that came from the cmdline, which need not be UTF-8.

use core::fmt;

/// Displays bytes as text: printable ASCII as is, anything else (and `\`) as
/// a `\xNN` escape, so a line on the serial console stays one printable line.
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            if (0x20..0x7f).contains(&b) && b != b'\\' {
                fmt::Write::write_char(f, char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_is_not_printable() {
        assert_eq!(Escaped(b"smp").to_string(), "smp");
        assert_eq!(Escaped(b"a\nb\\\xff").to_string(), "a\\x0ab\\x5c\\xff");
    }
}
