package org.ciar.demo;

/**
 * Maps a URL path of the app's asset origin to a file under assets/web, and gives its MIME type. Plain Java (no
 * Android imports), Java 8 without lambdas: the build dexes it with dx.
 */
final class AssetPaths {
    static final String HOST = "appassets.androidplatform.net";
    static final String START_URL = "https://" + HOST + "/index.html";

    private AssetPaths() {
    }

    /** The asset path ("web/...") for a URL path, or null when the path leaves the web folder. */
    static String assetFor(String urlPath) {
        String path = urlPath == null || urlPath.isEmpty() || urlPath.equals("/") ? "/index.html" : urlPath;
        if (!path.startsWith("/") || path.contains("..") || path.contains("\\") || path.contains("//")) {
            return null;
        }
        return "web" + path;
    }

    /** MIME type by extension: ES modules and WASM need the right one to load. */
    static String mimeType(String path) {
        String p = path.toLowerCase();
        if (p.endsWith(".html")) {
            return "text/html";
        } else if (p.endsWith(".js") || p.endsWith(".mjs")) {
            return "text/javascript";
        } else if (p.endsWith(".css")) {
            return "text/css";
        } else if (p.endsWith(".json")) {
            return "application/json";
        } else if (p.endsWith(".wasm")) {
            return "application/wasm";
        } else if (p.endsWith(".png")) {
            return "image/png";
        }
        return "application/octet-stream";
    }

    /** Only text types carry a charset. */
    static String encoding(String mime) {
        return mime.startsWith("text/") || mime.equals("application/json") ? "utf-8" : null;
    }
}
