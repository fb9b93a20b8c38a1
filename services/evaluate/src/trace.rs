//! Traces: files of requests per second of trace time, one a line (`#`
//! lines are comments), and the excerpts shipped in `traces/` with the
//! scale and speed-up each is played at.

use std::path::{Path, PathBuf};

use headroom_loadgen::{Profile, ProfileError};

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: ProfileError,
    },
    #[error("{path}: no rate from second {from} on")]
    Empty { path: String, from: usize },
}

/// Reads `path`, keeping `seconds` seconds from second `from` (all of the
/// rest without `seconds`).
///
/// # Errors
/// The file cannot be read, a line is not a rate, or nothing is left.
pub fn load(path: &Path, from: usize, seconds: Option<usize>) -> Result<Vec<f64>, TraceError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
        path: shown.clone(),
        source,
    })?;
    let rates = Profile::from_lines(&text, 1.0)
        .map_err(|source| TraceError::Parse {
            path: shown.clone(),
            source,
        })?
        .rates;
    let kept: Vec<f64> = rates
        .into_iter()
        .skip(from)
        .take(seconds.unwrap_or(usize::MAX))
        .collect();
    if kept.is_empty() {
        return Err(TraceError::Empty { path: shown, from });
    }
    Ok(kept)
}

/// A shipped excerpt and how the benchmark plays it.
#[derive(Debug, Clone, PartialEq)]
pub struct Excerpt {
    pub name: &'static str,
    pub file: &'static str,
    pub scale: f64,
    pub speedup: f64,
}

/// The excerpts in `traces/` (made by `scripts/make-traces.sh`), each
/// compressed to two minutes of wall-clock time, and scaled so that the
/// busiest spell needs most of the 20 servers.
pub const EXCERPTS: [Excerpt; 4] = [
    Excerpt {
        name: "daily-cycle",
        file: "nasa-daily-cycle.txt",
        scale: 150.0,
        speedup: 720.0,
    },
    Excerpt {
        name: "spike",
        file: "nasa-spike.txt",
        scale: 100.0,
        speedup: 180.0,
    },
    Excerpt {
        name: "night-rise",
        file: "nasa-night-rise.txt",
        scale: 200.0,
        speedup: 360.0,
    },
    Excerpt {
        name: "step-and-spike",
        file: "step-and-spike.txt",
        scale: 100.0,
        speedup: 10.0,
    },
];

impl Excerpt {
    pub fn path(&self, dir: &Path) -> PathBuf {
        dir.join(self.file)
    }

    pub fn find(name: &str) -> Option<&'static Excerpt> {
        EXCERPTS.iter().find(|e| e.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_cut_to_the_seconds_asked_for() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t.txt");
        std::fs::write(&path, "# counts\n1\n2\n3\n4\n").expect("write");
        assert_eq!(load(&path, 1, Some(2)).expect("trace"), vec![2.0, 3.0]);
        assert_eq!(load(&path, 0, None).expect("trace").len(), 4);
        assert!(matches!(
            load(&path, 9, None),
            Err(TraceError::Empty { .. })
        ));
        std::fs::write(&path, "1\nlots\n").expect("write");
        assert!(matches!(
            load(&path, 0, None),
            Err(TraceError::Parse { .. })
        ));
    }

    #[test]
    fn the_shipped_excerpts_are_there_and_last_two_minutes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../traces");
        for excerpt in &EXCERPTS {
            let trace = load(&excerpt.path(&dir), 0, None).expect("excerpt");
            let wall = trace.len() as f64 / excerpt.speedup;
            assert!(
                (119.0..=121.0).contains(&wall),
                "{}: {wall} s",
                excerpt.name
            );
        }
    }
}
