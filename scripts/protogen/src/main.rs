//! Compiles `proto/*.proto` with protox (pure Rust) and writes prost's message types to
//! `proto/src/gen/`. Usage: `protogen <proto dir> <out dir>`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (protos, out) = match (args.next(), args.next()) {
        (Some(p), Some(o)) => (p, o),
        _ => return Err("usage: protogen <proto dir> <out dir>".into()),
    };
    let files = ["inference.proto", "tensorflow.proto", "tensorflow_serving.proto"];
    let fds = protox::compile(files, [&protos])?;
    prost_build::Config::new()
        .out_dir(&out)
        // Tensor bytes stay views of the request body (no copy per input).
        .bytes(["."])
        // Services are dispatched by path in the router; only messages are generated.
        .service_generator(Box::new(NoServices))
        .compile_fds(fds)?;
    Ok(())
}

struct NoServices;

impl prost_build::ServiceGenerator for NoServices {
    fn generate(&mut self, _service: prost_build::Service, _buf: &mut String) {}
}
