//! Requests over a daemon's size limit are answered RESOURCE_EXHAUSTED naming the config key,
//! rather than tonic's OUT_OF_RANGE "decoded message length too large". The status comes in the
//! response's headers (a trailers-only answer) or its trailers; both are rewritten.

/// The config key of the limit, in the rewritten message.
const KEY: &str = "grpc.max_request_size";
/// What tonic's decoder says when a request is over `max_decoding_message_size`.
const TONIC_TOO_LARGE: &[u8] = b"Error, decoded message length too large";
/// `grpc-status` of OUT_OF_RANGE and RESOURCE_EXHAUSTED.
const OUT_OF_RANGE: &[u8] = b"11";
const RESOURCE_EXHAUSTED: &str = "8";

type Response = http::Response<tonic::body::Body>;

/// The layer both daemons put behind their role check.
pub type RequestLimitLayer = tower::util::MapResponseLayer<fn(Response) -> Response>;

pub fn layer() -> RequestLimitLayer {
    tower::util::MapResponseLayer::new(rewrite_response)
}

fn rewrite_response(mut response: Response) -> Response {
    rewrite(response.headers_mut(), KEY);
    response.map(|body| {
        use http_body_util::BodyExt;
        tonic::body::Body::new(body.map_frame(|frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                rewrite(&mut trailers, KEY);
                http_body::Frame::trailers(trailers)
            }
            Err(frame) => frame,
        }))
    })
}

/// Turns tonic's over-limit status (a trailers-only answer: the status is in the headers) into
/// RESOURCE_EXHAUSTED with a message naming the size, the limit and `key`.
fn rewrite(headers: &mut http::HeaderMap, key: &str) {
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(OUT_OF_RANGE) {
        return;
    }
    let said = headers
        .get("grpc-message")
        .map(|m| percent_decoded(m.as_bytes()))
        .unwrap_or_default();
    if !said.as_bytes().starts_with(TONIC_TOO_LARGE) {
        return;
    }
    let number_after = |label: &str| -> Option<u64> {
        let rest = &said[said.find(label)? + label.len()..];
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let message = match (number_after("found"), number_after("limit is:")) {
        (Some(size), Some(limit)) => format!(
            "the request is {size} bytes, over the limit of {limit} bytes ({key} in the server's config)"
        ),
        _ => format!("the request is over the server's size limit ({key})"),
    };
    headers.insert(
        "grpc-status",
        http::HeaderValue::from_static(RESOURCE_EXHAUSTED),
    );
    if let Ok(value) = http::HeaderValue::from_str(&message) {
        headers.insert("grpc-message", value);
    }
}

/// A `grpc-message` value as text (it is percent-encoded: tonic encodes spaces as `%20`).
fn percent_decoded(value: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            value[i],
            value.get(i + 1).copied().and_then(hex),
            value.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                bytes.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                bytes.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_over_limit_answer_becomes_resource_exhausted_naming_the_key() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", http::HeaderValue::from_static("11"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "Error,%20decoded%20message%20length%20too%20large:%20found%202097193%20bytes,%20the%20limit%20is:%201048576%20bytes",
            ),
        );
        rewrite(&mut headers, "grpc.max_request_size");
        assert_eq!(headers["grpc-status"], "8");
        assert_eq!(
            headers["grpc-message"],
            "the request is 2097193 bytes, over the limit of 1048576 bytes (grpc.max_request_size in the server's config)"
        );
        let mut other = http::HeaderMap::new();
        other.insert("grpc-status", http::HeaderValue::from_static("11"));
        other.insert(
            "grpc-message",
            http::HeaderValue::from_static("offset out of range"),
        );
        rewrite(&mut other, "grpc.max_request_size");
        assert_eq!(
            other["grpc-status"], "11",
            "other OUT_OF_RANGE answers are left alone"
        );
    }
}
