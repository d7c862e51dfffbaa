import Foundation
import HVHost
import HVSys

/// `POST /v1/disks/convert`: `hvctl disk convert`'s arguments.
struct ConvertDiskRequest: Decodable, Sendable {
    var source: String
    var destination: String
    var format: String

    enum CodingKeys: String, CodingKey, CaseIterable { case source, destination, format }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        source = try c.decode(String.self, forKey: .source)
        destination = try c.decode(String.self, forKey: .destination)
        format = try c.decode(String.self, forKey: .format)
    }
}

/// `POST /v1/disks/commit`: `hvctl disk commit`'s argument.
struct CommitDiskRequest: Decodable, Sendable {
    var overlay: String

    enum CodingKeys: String, CodingKey, CaseIterable { case overlay }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        overlay = try decoder.container(keyedBy: CodingKeys.self).decode(String.self, forKey: .overlay)
    }
}

extension VMService {
    /// Copies `request.source` (its backing chain flattened) into a new image, as a job that
    /// reports its progress and can be cancelled (the destination is then removed). hvd does
    /// the copy itself, on a thread of its own: a disk job ends if hvd does.
    func convertDisk(_ request: ConvertDiskRequest, _ scope: Scope) throws(APIError) -> Job {
        try Self.adminDiskJob(scope)
        let source = try Self.hostPath(request.source, "source")
        let destination = try Self.hostPath(request.destination, "destination")
        guard let format = VMDefinition.DiskFormat(rawValue: request.format) else {
            throw .badRequest("format '\(request.format)': use raw or qcow2")
        }
        try Self.requireImage(source)
        var st = stat()
        guard lstat(destination, &st) != 0 else { throw .conflict("'\(destination)' exists; name a new file for the copy") }
        let job = try jobs.begin("convert", vm: "", disk: destination)
        let jobs = self.jobs
        DispatchQueue.global().async {
            do throws(UsageError) {
                try DiskConvert.convert(source, to: destination, format: format, cancelled: { jobs.cancelRequested(job.id) }) {
                    jobs.progress(job.id, done: $0, of: $1)
                }
                jobs.finish(job.id, state: "succeeded", message: "converted \(source) to \(destination) (\(format.rawValue))")
            } catch {
                jobs.finish(job.id, state: "failed", error: error.message)
            }
        }
        return job
    }

    /// Folds qcow2 overlay `request.overlay` into its backing image, as a job that reports its
    /// progress; it cannot be cancelled once it writes the backing image.
    func commitDisk(_ request: CommitDiskRequest, _ scope: Scope) throws(APIError) -> Job {
        try Self.adminDiskJob(scope)
        let overlay = try Self.hostPath(request.overlay, "overlay")
        try Self.requireImage(overlay)
        let job = try jobs.begin("commit", vm: "", disk: overlay)
        let jobs = self.jobs
        DispatchQueue.global().async {
            do throws(UsageError) {
                let base = try DiskCommit.commit(overlay) { jobs.progress(job.id, done: $0, of: $1) }
                jobs.finish(job.id, state: "succeeded", message: "committed \(overlay) into \(base)")
            } catch {
                jobs.finish(job.id, state: "failed", error: error.message)
            }
        }
        return job
    }

    /// Images are host files hvd opens as root: the admin's to name.
    private static func adminDiskJob(_ scope: Scope) throws(APIError) {
        guard case .admin = scope else { throw .forbidden("tenants cannot convert or commit disk images; ask the host's admin") }
    }

    private static func hostPath(_ path: String, _ key: String) throws(APIError) -> String {
        guard path.utf8.first == UInt8(ascii: "/"), !path.utf8.contains(0) else {
            throw .badRequest("\(key) '\(path)' must be an absolute path on hvd's host")
        }
        return path
    }

    /// Refuses at once (422, before any job) an image that is not there to read.
    private static func requireImage(_ path: String) throws(APIError) {
        var st = stat()
        guard stat(path, &st) == 0 else { throw .unprocessable("cannot open disk image '\(path)': \(Errno.current)") }
        guard st.st_mode & S_IFMT == S_IFREG else { throw .unprocessable("disk image '\(path)' is not a regular file") }
    }
}
