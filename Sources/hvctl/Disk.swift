import Glibc

/// `hvctl disk create PATH --size SIZE`: a new raw, thin-provisioned (sparse) disk image. The file
/// has the full size and no allocated blocks; space is used as the guest writes.
func diskCommand(_ arguments: ArraySlice<String>) throws(UsageError) -> Int32 {
    let usage = "usage: hvctl disk create PATH --size SIZE   (e.g. --size 20G; a sparse raw image)"
    var rest = arguments
    guard let verb = rest.popFirst() else { throw UsageError(message: "disk needs a subcommand; \(usage)") }
    if verb == "-h" || verb == "--help" {
        print(usage)
        return 0
    }
    guard verb == "create" else { throw UsageError(message: "unknown disk subcommand '\(verb)'; \(usage)") }
    var path: String?
    var size: UInt64?
    while let arg = rest.popFirst() {
        var flag = arg
        if arg.hasPrefix("--"), let eq = arg.firstIndex(of: "=") {
            flag = String(arg[..<eq])
            rest.insert(String(arg[arg.index(after: eq)...]), at: rest.startIndex)
        }
        switch flag {
        case "--size":
            guard let v = rest.popFirst() else { throw UsageError(message: "--size needs a value; \(usage)") }
            size = try parseSize(v, flag: "--size")
        case let p where !p.hasPrefix("-") && path == nil:
            path = p
        default:
            throw UsageError(message: "unexpected '\(arg)'; \(usage)")
        }
    }
    guard let path else { throw UsageError(message: "disk create needs a PATH; \(usage)") }
    guard let size else { throw UsageError(message: "disk create needs --size; \(usage)") }
    // SCSI addresses 512-byte blocks; a size that is not a whole number of them would hide a tail.
    guard size % 512 == 0 else { throw UsageError(message: "--size \(size) is not a multiple of 512 bytes (a disk is whole sectors)") }
    guard size <= UInt64(Int64.max) else { throw UsageError(message: "--size is too large") }
    // O_EXCL: never truncate or resize an existing image (it may hold someone's data).
    let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
    if fd < 0 {
        let e = errno
        // Run-time failures (exit 1), not usage errors: the command was well formed.
        if e == EEXIST { fail("'\(path)' already exists: hvctl never overwrites a disk image; remove it or pick another path") }
        fail("cannot create '\(path)': \(String(cString: strerror(e)))")
    }
    defer { close(fd) }
    if ftruncate(fd, off_t(size)) != 0 {
        let e = errno
        unlink(path)
        fail("cannot size '\(path)' to \(size) bytes: \(String(cString: strerror(e)))")
    }
    print("created \(path): \(size) bytes (\(size >> 20) MiB), sparse raw image")
    return 0
}
