//! Link the freestanding LWK image: no C runtime, no libc, static, not
//! position independent, at the fixed address `lwk_abi::layout::IMAGE_BASE`
//! (outside the application's range, see crates/abi/src/layout.rs), taken
//! from there so that the layout has one source. A change to lwk-abi rebuilds
//! and reruns this script.
fn main() {
    let base = format!("-Wl,--image-base={:#x}", lwk_abi::layout::IMAGE_BASE);
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie", &base, "-Wl,--build-id=none"] {
        println!("cargo:rustc-link-arg-bin=lwk-kernel={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
