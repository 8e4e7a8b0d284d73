// SPDX-License-Identifier: Apache-2.0
//! A cpio "newc" (SVR4, no CRC) archive writer: what the Linux kernel unpacks
//! as an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Each entry is a 110-byte ASCII header (`070701` and 13 eight-digit hex
//! fields), the NUL-terminated name padded to 4 bytes, then the data padded
//! to 4 bytes; the archive ends with the entry `TRAILER!!!`. The writer takes
//! entries in the order given; [`crate::image`] sorts them and fixes every
//! timestamp and owner so the same tree always gives the same bytes.

use std::io::{self, Write};

/// File type bits of `mode`.
pub mod mode {
    /// Directory.
    pub const DIR: u32 = 0o040000;
    /// Regular file.
    pub const FILE: u32 = 0o100000;
    /// Symbolic link.
    pub const SYMLINK: u32 = 0o120000;
    /// Character device.
    pub const CHAR: u32 = 0o020000;
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with its contents.
    File(Vec<u8>),
    /// A symbolic link to the target.
    Symlink(String),
    /// A character device (major, minor).
    Char(u32, u32),
}

/// One archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path without a leading `/` (`init`, `bin/busybox`).
    pub path: String,
    /// What it is.
    pub kind: Kind,
    /// Permission bits (`0o755`).
    pub perm: u32,
}

impl Entry {
    fn mode(&self) -> u32 {
        let t = match self.kind {
            Kind::Dir => mode::DIR,
            Kind::File(_) => mode::FILE,
            Kind::Symlink(_) => mode::SYMLINK,
            Kind::Char(..) => mode::CHAR,
        };
        t | (self.perm & 0o7777)
    }

    fn data(&self) -> &[u8] {
        match &self.kind {
            Kind::File(d) => d,
            Kind::Symlink(t) => t.as_bytes(),
            Kind::Dir | Kind::Char(..) => &[],
        }
    }
}

/// Errors of the writer.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// A name or file is too large for the format's 32-bit fields.
    #[error("{0} is too large for a cpio newc archive")]
    TooLarge(String),
    /// A name has a NUL byte or is empty.
    #[error("invalid archive path {0:?}")]
    BadPath(String),
    /// Writing failed.
    #[error("cannot write the archive")]
    Io(#[from] io::Error),
}

/// Writes newc archives.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    /// Timestamp put in every header.
    mtime: u32,
}

fn pad4(n: u64) -> usize {
    ((4 - (n % 4)) % 4) as usize
}

impl<W: Write> Writer<W> {
    /// A writer that stamps every entry with `mtime`.
    pub fn new(out: W, mtime: u32) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            mtime,
        }
    }

    fn put(&mut self, b: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> Result<(), CpioError> {
        if name.is_empty() || name.contains('\0') {
            return Err(CpioError::BadPath(name.to_string()));
        }
        let namesize =
            u32::try_from(name.len() + 1).map_err(|_| CpioError::TooLarge(name.to_string()))?;
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            self.next_ino
        };
        self.next_ino += 1;
        let h = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = self.mtime,
            maj = 0,
            min = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        let pad = pad4(self.written);
        self.put(&[0u8; 3][..pad])
    }

    /// Appends one entry.
    pub fn add(&mut self, e: &Entry) -> Result<(), CpioError> {
        let data = e.data();
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(e.path.clone()))?;
        let nlink = if matches!(e.kind, Kind::Dir) { 2 } else { 1 };
        let rdev = match e.kind {
            Kind::Char(a, b) => (a, b),
            _ => (0, 0),
        };
        self.header(&e.path, e.mode(), nlink, size, rdev)?;
        self.put(data)?;
        let pad = pad4(self.written);
        self.put(&[0u8; 3][..pad])
    }

    /// Writes the trailer and returns the output and the archive size.
    pub fn finish(mut self) -> Result<(W, u64), CpioError> {
        self.header("TRAILER!!!", 0, 1, 0, (0, 0))?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }
}

/// Reads back a newc archive (for tests and `cell0-rootfs inspect`):
/// (path, mode, data) per entry, trailer excluded.
pub fn read(mut buf: &[u8]) -> Result<Vec<(String, u32, Vec<u8>)>, String> {
    let total = buf.len();
    let mut out = Vec::new();
    loop {
        if buf.len() < 110 || &buf[..6] != b"070701" {
            return Err(format!("bad header at offset {}", total - buf.len()));
        }
        let field = |i: usize| -> Result<u32, String> {
            let s = std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).map_err(|e| e.to_string())?;
            u32::from_str_radix(s, 16).map_err(|e| e.to_string())
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let namesize = field(11)? as usize;
        let name_end = 110 + namesize;
        let name = buf.get(110..name_end - 1).ok_or("name past the end")?;
        let name = String::from_utf8_lossy(name).into_owned();
        let data_start = name_end + pad4(name_end as u64 + (total - buf.len()) as u64);
        let data = buf
            .get(data_start..data_start + size)
            .ok_or("data past the end")?
            .to_vec();
        let next = data_start + size;
        let next = next + pad4((next + total - buf.len()) as u64);
        if name == "TRAILER!!!" {
            return Ok(out);
        }
        out.push((name, mode, data));
        buf = buf.get(next..).ok_or("truncated")?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn header_layout_matches_the_kernel_format() {
        let mut w = Writer::new(Vec::new(), 0);
        w.add(&Entry {
            path: "init".into(),
            kind: Kind::File(b"abc".to_vec()),
            perm: 0o755,
        })
        .unwrap();
        let (out, n) = w.finish().unwrap();
        assert_eq!(n as usize, out.len());
        assert_eq!(out.len() % 4, 0);
        let h = std::str::from_utf8(&out[..110]).unwrap();
        assert_eq!(&h[..6], "070701");
        assert_eq!(&h[6..14], "00000001", "inode");
        assert_eq!(&h[14..22], "000081ed", "regular file 0755");
        assert_eq!(&h[54..62], "00000003", "size");
        assert_eq!(&h[94..102], "00000005", "namesize with NUL");
        assert_eq!(&out[110..115], b"init\0");
        // 110 + 5 = 115, padded to 116; data at 116.
        assert_eq!(&out[116..119], b"abc");
        let back = read(&out).unwrap();
        assert_eq!(back, vec![("init".to_string(), 0o100755, b"abc".to_vec())]);
    }

    #[test]
    fn every_kind_round_trips() {
        let entries = vec![
            Entry {
                path: "dev".into(),
                kind: Kind::Dir,
                perm: 0o755,
            },
            Entry {
                path: "dev/console".into(),
                kind: Kind::Char(5, 1),
                perm: 0o600,
            },
            Entry {
                path: "bin/sh".into(),
                kind: Kind::Symlink("busybox".into()),
                perm: 0o777,
            },
            Entry {
                path: "x".into(),
                kind: Kind::File(vec![7; 1001]),
                perm: 0o644,
            },
        ];
        let mut w = Writer::new(Vec::new(), 0);
        for e in &entries {
            w.add(e).unwrap();
        }
        let (out, _) = w.finish().unwrap();
        let back = read(&out).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back[1].1, 0o020600);
        assert_eq!(back[2].2, b"busybox");
        assert_eq!(back[3].2, vec![7; 1001]);
        assert!(matches!(
            Writer::new(Vec::new(), 0).add(&Entry {
                path: "a\0b".into(),
                kind: Kind::Dir,
                perm: 0
            }),
            Err(CpioError::BadPath(_))
        ));
    }
}
