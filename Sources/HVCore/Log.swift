import Glibc

/// Operator-facing diagnostics: one line each, on stderr, prefixed `hv:`. A single write(2) per
/// line so lines from different threads never interleave.
enum Diagnostics {
    static func line(_ text: String) {
        let message = "hv: \(text)\n"
        message.withCString { _ = Glibc.write(2, $0, strlen($0)) }
    }
}
