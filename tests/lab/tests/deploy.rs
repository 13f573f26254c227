//! `deploy/Containerfile` cannot be built here (no container engine), so its build step is checked against the
//! workspace: it builds with a Cargo profile that exists, and copies the binaries from that profile's directory.

use std::path::Path;

#[test]
fn the_containerfile_builds_with_a_profile_of_the_workspace_and_copies_its_binaries() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let containerfile = std::fs::read_to_string(root.join("deploy/Containerfile")).unwrap();
    let cargo_toml = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let build = containerfile.lines().find(|l| l.starts_with("RUN cargo build")).expect("a cargo build step");
    let profile = build.split("--profile ").nth(1).and_then(|t| t.split_whitespace().next()).unwrap_or_else(|| {
        panic!("the image is built with an explicit profile, so its optimisation is chosen on purpose: {build}")
    });
    assert!(cargo_toml.contains(&format!("[profile.{profile}]")), "no [profile.{profile}] in Cargo.toml");
    let copy = containerfile.lines().find(|l| l.starts_with("COPY --from=build")).expect("a COPY of the binaries");
    // `COPY --from=build <sources…> <destination>`
    let words: Vec<&str> = copy.split_whitespace().collect();
    let sources = &words[2..words.len() - 1];
    assert_eq!(sources.len(), 3, "{copy}");
    for (src, bin) in sources.iter().zip(["ambit-agent", "ambit-cni", "ztunnel"]) {
        assert_eq!(*src, format!("/src/target/{profile}/{bin}"), "{copy}");
    }
}
