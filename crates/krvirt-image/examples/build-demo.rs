//! Build the demo guest images into a directory and print their paths:
//! `cargo run -p krvirt-image --example build-demo -- OUT_DIR`
use std::path::PathBuf;

fn main() {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: build-demo OUT_DIR");
        std::process::exit(2);
    };
    let start = std::time::Instant::now();
    match krvirt_image::build_demo_images(&out, &krvirt_image::GuestBuildOptions::default()) {
        Ok(images) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&images).unwrap_or_default()
            );
            eprintln!("built in {:.2?}", start.elapsed());
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
