import Glibc

/// Where an HTTP server (hvd, hv-firecracker) binds its Unix socket so that the socket's path
/// appears only once the server accepts connections.
///
/// A server's bind() creates the path and its listen() follows: a client that waits for the path
/// to exist (as Firecracker's clients do) and connects in between is refused (ECONNREFUSED). So
/// the server binds a hidden name in the same directory and `publish()` renames it into place
/// after listen (and after any chown/chmod, so the path never shows the wrong owner either).
public struct StagedSocketPath: Sendable {
    /// The path clients use.
    public let path: String
    /// The path the server binds: a hidden sibling of `path`, or `path` itself where the sibling's
    /// name would not fit a socket address.
    public let bindPath: String

    /// The longest path a Unix socket address holds (sun_path less its NUL).
    static let maximumLength = 107

    public init(_ path: String) {
        self.path = path
        let slash = path.lastIndex(of: "/")
        let directory = slash.map { String(path[...$0]) } ?? ""
        let name = slash.map { String(path[path.index(after: $0)...]) } ?? path
        let staged = "\(directory).\(name).\(getpid()).binding"
        bindPath = staged.utf8.count <= Self.maximumLength ? staged : path
    }

    /// Moves the listening socket to `path`, replacing what is there; a one-line reason on failure.
    public func publish() -> String? {
        guard bindPath != path else { return nil }
        guard rename(bindPath, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(bindPath)
            return "cannot move the API socket into place at \(path): \(reason)"
        }
        return nil
    }

    /// Removes whichever of the two paths the socket is at (when the server stops).
    public func remove() {
        unlink(path)
        if bindPath != path { unlink(bindPath) }
    }
}
