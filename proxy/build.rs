//! Link flags for the `weft-proxy` binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Relative relocations packed (DT_RELR, glibc 2.36+, binutils 2.38+): the
    // position-independent binary's 13,000-odd relative relocations take a few
    // kilobytes instead of 320 KB, which the loader no longer reads and maps at
    // every start (a sidecar's idle RSS and cold start).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
