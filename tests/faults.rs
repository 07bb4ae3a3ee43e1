//! Faults in the daemon's own files, on the real binary: the state directory unwritable or full
//! at start (a read-only or full tmpfs in a private mount namespace, which changes nothing outside
//! the test; and a daemon running as an unprivileged user), and the role mapping file removed or
//! corrupted while the daemon runs.

mod common;

use std::path::Path;

/// Run by `sh` inside `unshare --mount`: mounts a tmpfs with options "$2" on "$1", fills it up
/// when "$3" is `yes`, runs the rest of the arguments (the daemon), then says on stderr what the
/// daemon left in the directory, and exits with the daemon's code. Exit 99: no tmpfs.
const IN_NAMESPACE: &str = r#"
dir="$1"; options="$2"; fill="$3"; shift 3
mount -t tmpfs -o "$options" imdsd-test "$dir" || exit 99
if [ "$fill" = yes ]; then head -c 1048576 /dev/zero > "$dir/filler" 2>/dev/null; fi
"$@"
code=$?
echo "left in the state directory: [$(ls -A "$dir" | grep -v '^filler$' | tr '\n' ' ')]" >&2
exit $code
"#;

/// Runs the daemon (offline, on loopback) with a tmpfs mounted on `dir` in a private mount
/// namespace; `env` and `args` go to the daemon. Returns its exit code and stderr.
fn with_tmpfs_state(
    dir: &Path,
    options: &str,
    full: bool,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let dir = dir.to_str().expect("utf8");
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        IN_NAMESPACE,
        "sh",
        dir,
        options,
        if full { "yes" } else { "no" },
    ];
    let mut all = vec![
        "--fake-credentials",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "none",
        "--docker-host",
        "none",
    ];
    all.extend_from_slice(args);
    let (code, stderr) = common::run_to_exit_under(&wrapper, &all, env);
    assert_ne!(
        code,
        Some(99),
        "cannot mount a tmpfs in a private mount namespace (unshare --mount needs root or user \
         namespaces): {stderr}"
    );
    (code, stderr)
}

/// What the daemon left in the state directory, from [`IN_NAMESPACE`]'s last line.
fn left_behind(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("left in the state directory: "))
        .unwrap_or_else(|| panic!("no listing in: {stderr}"))
        .trim()
        .to_string()
}

#[test]
fn a_full_state_directory_stops_the_start_naming_it_and_the_fix_and_leaves_nothing_half_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state");
    std::fs::create_dir(&dir).expect("mkdir");
    let path = dir.to_str().expect("utf8");
    let (code, stderr) =
        with_tmpfs_state(&dir, "size=4k", true, &["--state-dir", path, "demo"], &[]);
    eprintln!("{stderr}");
    assert_eq!(code, Some(64), "the operator's to fix: {stderr}");
    assert!(stderr.contains(path), "names the directory: {stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(stderr.contains("free space"), "says the fix: {stderr}");
    assert_eq!(left_behind(&stderr), "[]", "{stderr}");
}

#[test]
fn a_full_systemd_state_directory_stops_the_start_naming_it_and_the_fix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state");
    std::fs::create_dir(&dir).expect("mkdir");
    let path = dir.to_str().expect("utf8");
    let (code, stderr) = with_tmpfs_state(
        &dir,
        "size=4k",
        true,
        &["demo"],
        &[("STATE_DIRECTORY", path)],
    );
    eprintln!("{stderr}");
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains(path), "names the directory: {stderr}");
    assert!(stderr.contains("free space"), "says the fix: {stderr}");
    assert_eq!(left_behind(&stderr), "[]", "{stderr}");
}

#[test]
fn a_read_only_state_directory_stops_the_start_naming_it_and_the_fix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state");
    std::fs::create_dir(&dir).expect("mkdir");
    let path = dir.to_str().expect("utf8");
    let (code, stderr) = with_tmpfs_state(&dir, "ro", false, &["--state-dir", path, "demo"], &[]);
    eprintln!("{stderr}");
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains(path), "names the directory: {stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert!(
        stderr.contains("choose another directory"),
        "says the fix: {stderr}"
    );
    assert_eq!(left_behind(&stderr), "[]", "{stderr}");
}

#[test]
fn a_state_directory_the_daemons_user_may_not_write_stops_the_start_naming_it_and_the_fix() {
    // Owned by root and closed to others; the daemon runs as nobody.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state");
    let path = dir.to_str().expect("utf8");
    let (code, stderr) = common::run_to_exit_under(
        &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ],
        &[
            "--fake-credentials",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "none",
            "--docker-host",
            "none",
            "--state-dir",
            path,
            "demo",
        ],
        &[],
    );
    eprintln!("{stderr}");
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains(path), "names the directory: {stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(stderr.contains("write access"), "says the fix: {stderr}");
    assert!(!dir.exists(), "nothing created");
}
