//! Link the freestanding LWK image: no C runtime, no libc, static, not
//! position independent, at the fixed address `lwk_abi::layout::IMAGE_BASE`
//! (outside the application's range, see crates/abi/src/layout.rs).
fn main() {
    let base = "0x6f0000000000";
    for arg in
        ["-nostartfiles", "-nostdlib", "-static", "-no-pie", &format!("-Wl,--image-base={base}"), "-Wl,--build-id=none"]
    {
        println!("cargo:rustc-link-arg-bin=lwk-kernel={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
