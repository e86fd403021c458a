//! The daemon library stands alone: the command line (`regctl`, in
//! `registry-client`) and the load generator (`registry-bench`) are clients
//! of it over gRPC, and `registry` depends on neither of them nor on their
//! command-line and statistics crates, not even for its own tests.

use std::process::Command;

#[test]
fn daemon_depends_on_neither_client_nor_cli_crates() {
    let output = Command::new(env!("CARGO"))
        .args(["tree", "--package", "registry", "--prefix", "none"])
        .args(["--edges", "normal,build,dev", "--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8(output.stdout).unwrap();
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(names.contains(&"registry"), "{tree}");
    assert!(names.contains(&"tonic"), "the tree was read: {tree}");
    for banned in [
        "registry-client",
        "registry-bench",
        "hdrhistogram",
        "clap_complete",
    ] {
        assert!(
            !names.contains(&banned),
            "`cargo tree -p registry` lists {banned}"
        );
    }
}
