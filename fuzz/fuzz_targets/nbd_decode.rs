//! The NBD codec's decoders must never panic: any bytes give a value or an
//! error. The input is tried as an option (header, then its data), as the data
//! of every option number, and as compact and extended requests; a request
//! that decodes re-encodes to the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ubd::nbd::codec::{
    ClientOption, OPTION_HEADER_LEN, OptionHeader, Request, decode_client_flags, parse_option,
};

fn walk(parsed: ClientOption<'_>) {
    match parsed {
        ClientOption::Info(i) | ClientOption::Go(i) => {
            assert_eq!(i.requests.iter().count(), i.requests.len());
        }
        ClientOption::ListMetaContext(m) | ClientOption::SetMetaContext(m) => {
            assert_eq!(m.queries.iter().count(), m.queries.len());
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = decode_client_flags(data);
    if let Ok(header) = OptionHeader::decode(data) {
        let rest = data.get(OPTION_HEADER_LEN..).unwrap_or_default();
        let len = (header.length as usize).min(rest.len());
        if let Ok(parsed) = parse_option(header.option, &rest[..len]) {
            walk(parsed);
        }
    }
    for option in 0..=12 {
        if let Ok(parsed) = parse_option(option, data) {
            walk(parsed);
        }
    }
    if let Ok(request) = Request::decode(data) {
        let mut out = Vec::new();
        request
            .encode(&mut out)
            .expect("a compact request re-encodes");
        assert_eq!(out, data[..out.len()]);
    }
    if let Ok(request) = Request::decode_extended(data) {
        let mut out = Vec::new();
        request.encode_extended(&mut out);
        assert_eq!(out, data[..out.len()]);
    }
});
