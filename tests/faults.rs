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

/// The role mapping file is read once, at start (reloading it is for a later issue): removing it,
/// corrupting it or replacing it while the daemon runs changes nothing — each mapped caller keeps
/// its role, the daemon logs nothing alarming and keeps running.
#[tokio::test(flavor = "multi_thread")]
async fn the_mapping_file_removed_or_corrupted_after_start_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mapping = dir.path().join("roles.json");
    std::fs::write(
        &mapping,
        r#"{"127.0.0.7": "mapped-exact", "127.0.0.8/29": "mapped-network"}"#,
    )
    .expect("write");
    let state = dir.path().join("state");
    let mut d = common::Process::spawn(
        &[
            "--fake-credentials",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().expect("utf8"),
            "--role-mapping-file",
            mapping.to_str().expect("utf8"),
        ],
        &[],
    );
    let addr = d.addr();
    let roles = || async {
        let mut seen = Vec::new();
        for caller in ["127.0.0.7", "127.0.0.9", "127.0.0.20"] {
            let r = common::raw_from(
                caller.parse().expect("ip"),
                addr,
                "GET",
                "/latest/meta-data/iam/security-credentials/",
                &[],
            )
            .await;
            // The role listing; a 404 is EC2's page, the same every time.
            let listed = if r.status == 200 {
                String::from_utf8_lossy(&r.body).into_owned()
            } else {
                String::new()
            };
            seen.push((caller, r.status, listed));
        }
        seen
    };
    let expected = vec![
        ("127.0.0.7", 200, "mapped-exact".to_string()),
        ("127.0.0.9", 200, "mapped-network".to_string()),
        // Outside the file and without a default role: no role, as on an instance without one.
        ("127.0.0.20", 404, String::new()),
    ];
    assert_eq!(roles().await, expected);
    let creds = common::raw_from(
        "127.0.0.7".parse().expect("ip"),
        addr,
        "GET",
        "/latest/meta-data/iam/security-credentials/mapped-exact",
        &[],
    )
    .await;
    assert_eq!(creds.status, 200, "{creds:?}");
    let lines_at_start = d.log_text().lines().count();

    std::fs::remove_file(&mapping).expect("remove");
    assert_eq!(roles().await, expected, "after the file was removed");
    std::fs::write(&mapping, "{\"127.0.0.7\": \"mapped-exa").expect("corrupt");
    assert_eq!(roles().await, expected, "after the file was corrupted");
    std::fs::write(
        &mapping,
        r#"{"127.0.0.7": "someone-else", "127.0.0.20": "x"}"#,
    )
    .expect("replace");
    assert_eq!(roles().await, expected, "after the file was replaced");
    let creds = common::raw_from(
        "127.0.0.7".parse().expect("ip"),
        addr,
        "GET",
        "/latest/meta-data/iam/security-credentials/mapped-exact",
        &[],
    )
    .await;
    assert_eq!(creds.status, 200, "{creds:?}");
    assert!(String::from_utf8_lossy(&creds.body).contains("\"Success\""));

    assert_eq!(d.child.try_wait().expect("wait"), None, "the daemon exited");
    let log = d.log_text();
    let since: Vec<&str> = log.lines().skip(lines_at_start).collect();
    assert!(!since.is_empty(), "the requests were logged");
    for line in since {
        assert!(
            line.contains("\"level\":\"INFO\"") || line.contains("\"level\":\"DEBUG\""),
            "nothing alarming after the change: {line}"
        );
    }
    assert!(!log.contains("panicked"), "{log}");
}
