//! Print the generated OpenAPI component schemas as JSON:
//! `cargo run -p krvirt-api --example openapi`.
fn main() {
    let components = krvirt_api::openapi_components();
    match serde_json::to_string_pretty(&components) {
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
