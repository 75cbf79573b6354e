//! `haven sample`: writes the generated sample (`haven-sample`) as transaction
//! Bundle files that `haven load` reads.

use std::path::Path;

use anyhow::{bail, Context, Result};
use haven_sample::{generate, Options, Sample};

/// Most patients one sample may hold: enough for any demo or test, and a typo
/// such as `--patients 1000000000` is refused rather than filling the disk.
pub const MAX_PATIENTS: usize = 100_000;

/// Generates the sample and writes one file per Bundle into `out`, which is
/// created if missing. A folder holding other `*.json` files is refused, so a
/// later `haven load` of it loads this sample and nothing else.
pub fn write(out: &Path, options: Options) -> Result<Sample> {
    if options.patients == 0 || options.patients > MAX_PATIENTS {
        bail!("--patients must be between 1 and {MAX_PATIENTS}");
    }
    let sample = generate(options);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let ours: std::collections::BTreeSet<&str> =
        sample.files.iter().map(|f| f.name.as_str()).collect();
    let entries = std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))?;
    for entry in entries {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".json") && !ours.contains(name.as_ref()) {
            bail!(
                "{} already holds other Bundles ({name}); write the sample to an empty folder",
                out.display()
            );
        }
    }
    for file in &sample.files {
        let path = out.join(&file.name);
        std::fs::write(&path, file.to_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(sample)
}

/// What `haven sample` prints.
pub fn describe(sample: &Sample, out: &Path, seed: u64) -> String {
    let mut lines = vec![format!(
        "wrote {} bundles ({} resources, {} patients, seed {seed}) to {}",
        sample.files.len(),
        sample.resources(),
        sample.patients.len(),
        out.display()
    )];
    for patient in &sample.patients {
        let mut notes: Vec<String> = patient
            .sensitive
            .iter()
            .map(|c| format!("a condition labeled {c}"))
            .collect();
        notes.extend(patient.consents.iter().cloned());
        if !notes.is_empty() {
            lines.push(format!(
                "  {} ({}): {}",
                patient.person.name,
                patient.person.reference,
                notes.join("; ")
            ));
        }
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_are_written_and_written_again_identically() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            patients: 3,
            seed: 4,
        };
        let sample = write(dir.path(), options).unwrap();
        let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
        let first: Vec<Vec<u8>> = sample.files.iter().map(|f| read(&f.name)).collect();
        assert_eq!(first.len(), 4);
        write(dir.path(), options).unwrap();
        let second: Vec<Vec<u8>> = sample.files.iter().map(|f| read(&f.name)).collect();
        assert_eq!(first, second);
        let text = describe(&sample, dir.path(), 4);
        assert!(text.starts_with("wrote 4 bundles ("), "{text}");
        assert!(
            text.contains("a condition labeled PSY; research use refused"),
            "{text}"
        );
    }

    #[test]
    fn a_folder_with_other_bundles_or_an_absurd_count_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.json"), "{}").unwrap();
        let err = write(
            dir.path(),
            Options {
                patients: 2,
                seed: 1,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("already holds other Bundles (mine.json)"),
            "{err}"
        );
        for patients in [0, MAX_PATIENTS + 1] {
            let err = write(dir.path(), Options { patients, seed: 1 })
                .unwrap_err()
                .to_string();
            assert!(err.contains("--patients must be between 1 and"), "{err}");
        }
    }
}
