//! Admit a YAML manifest (every document) and print the admitted JSON or
//! the causes: `cargo run -p krvirt-api --example admit -- FILE.yaml`.
fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: admit FILE.yaml");
        std::process::exit(2);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
    };
    let docs: Vec<serde_json::Value> = match serde_saphyr::from_multiple(&text) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
    };
    let mut failed = false;
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        match krvirt_api::kind_for_object(&doc).and_then(|k| krvirt_api::admit(k, doc, None)) {
            Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
            Err(e) => {
                failed = true;
                for c in &e.causes {
                    println!("{c}");
                }
            }
        }
    }
    std::process::exit(i32::from(failed));
}
