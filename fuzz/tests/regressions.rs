// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! Replays every input under `fuzz/regressions/<target>/` (each crash the
//! fuzzers ever found, kept after the fix) and the seed corpus under
//! `fuzz/corpus/<target>/` through the harnesses.

use std::path::{Path, PathBuf};

use cell0_fuzz::TARGETS;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.file_name().is_none_or(|n| n != "README.md"))
        .collect();
    v.sort();
    v
}

fn replay(kind: &str) -> usize {
    let mut n = 0;
    for (name, f) in TARGETS {
        for p in inputs(&root().join(kind).join(name)) {
            let data = std::fs::read(&p).unwrap();
            eprintln!("replaying {}", p.display());
            f(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn every_crash_input_ever_found_still_passes() {
    let n = replay("regressions");
    eprintln!("{n} regression inputs replayed");
}

#[test]
fn the_seed_corpus_passes() {
    let n = replay("corpus");
    assert!(n > 0, "the seed corpus is empty");
}

#[test]
fn corpus_folders_name_real_targets() {
    for kind in ["regressions", "corpus"] {
        for e in std::fs::read_dir(root().join(kind)).unwrap() {
            let e = e.unwrap();
            if !e.path().is_dir() {
                continue;
            }
            let name = e.file_name().into_string().unwrap();
            assert!(
                TARGETS.iter().any(|(t, _)| *t == name),
                "{kind}/{name} is not a target"
            );
        }
    }
}

#[test]
fn every_target_has_a_libfuzzer_binary() {
    let manifest = std::fs::read_to_string(root().join("libfuzzer/Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "{name} has no [[bin]] in fuzz/libfuzzer/Cargo.toml"
        );
        assert!(
            root()
                .join(format!("libfuzzer/fuzz_targets/{name}.rs"))
                .is_file()
        );
    }
}
