import CHVShim
import Glibc

/// The second, stricter seccomp stage that the core compiles from a sandboxed process's profile
/// (no execve, no open) and its jail leaves on a descriptor; the process installs it itself before it
/// reads any untrusted input. Device processes (through the SDK) and the segment switch share it.
public enum LockDown {
    /// Where the jail leaves the compiled filter (classic BPF, in a sealed memfd).
    public static let filterDescriptor: Int32 = 5

    /// Why the filter could not be installed.
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// Installs the filter and makes the process non-dumpable; a denied syscall then traps, is
    /// reported on `deniedSyscallReport` (a LOG frame; -1 reports nothing) and exits the process.
    /// Returns false when there is no filter and the process is not sandboxed (`--no-sandbox`).
    @discardableResult
    public static func apply(reportingDeniedSyscallsTo deniedSyscallReport: Int32) throws(Failure) -> Bool {
        let raw = filterDescriptor
        guard fcntl(raw, F_GETFD) >= 0 else {
            if getenv("HV_SANDBOXED") != nil { throw Failure(description: "started in a jail without its lock-down filter on fd \(raw)") }
            return false
        }
        let fd = FileDescriptor(owning: raw)
        let program: [UInt8]
        do { program = try fd.readAll() } catch { throw Failure(description: "cannot read the lock-down filter: \(error)") }
        fd.close()
        _ = hv_prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        if hv_install_sigsys_reporter(deniedSyscallReport) != 0 {
            throw Failure(description: "cannot install the SIGSYS reporter: \(Errno.current)")
        }
        let rc = program.withUnsafeBytes { hv_install_seccomp_filter($0.baseAddress, $0.count) }
        if rc != 0 { throw Failure(description: "cannot install the lock-down filter: \(Errno.current)") }
        return true
    }
}
