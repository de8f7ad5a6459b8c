package org.ciar.demo;

import android.app.Activity;
import android.content.res.AssetManager;
import android.net.Uri;
import android.os.Bundle;
import android.webkit.WebResourceRequest;
import android.webkit.WebResourceResponse;
import android.webkit.WebSettings;
import android.webkit.WebView;
import android.webkit.WebViewClient;

import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.Charset;
import java.util.HashMap;
import java.util.Map;

/**
 * One WebView showing the web demo from the APK's assets (assets/web: the page, onnxruntime-web, the int8 device
 * bundle). The assets are served under https://appassets.androidplatform.net/ by shouldInterceptRequest, so ES
 * modules, WASM and fetch() work as on a web server, and the page is a secure context (crypto.subtle for the
 * bundle's SHA-256 check). The prompt box, the cloud URL and the device-only switch are the page's own controls;
 * the page keeps the cloud settings in localStorage.
 */
public class MainActivity extends Activity {
    private WebView web;

    @Override
    protected void onCreate(Bundle state) {
        super.onCreate(state);
        web = new WebView(this);
        WebSettings s = web.getSettings();
        s.setJavaScriptEnabled(true);
        s.setDomStorageEnabled(true);
        s.setAllowFileAccess(false);
        s.setAllowContentAccess(false);
        // the page's origin is https; a cloud on the LAN is usually ws:// (plain): allow it
        s.setMixedContentMode(WebSettings.MIXED_CONTENT_ALWAYS_ALLOW);
        web.setWebViewClient(new AssetClient(getAssets()));
        setContentView(web);
        if (state == null) {
            web.loadUrl(AssetPaths.START_URL);
        } else {
            web.restoreState(state);
        }
    }

    @Override
    protected void onSaveInstanceState(Bundle out) {
        super.onSaveInstanceState(out);
        web.saveState(out);
    }

    @Override
    public void onBackPressed() {
        if (web.canGoBack()) {
            web.goBack();
        } else {
            super.onBackPressed();
        }
    }

    @Override
    protected void onDestroy() {
        web.destroy();
        super.onDestroy();
    }

    /** Serves assets/web under the asset origin; every other host goes to the network as usual. */
    static final class AssetClient extends WebViewClient {
        private final AssetManager assets;

        AssetClient(AssetManager assets) {
            this.assets = assets;
        }

        @Override
        public WebResourceResponse shouldInterceptRequest(WebView view, WebResourceRequest request) {
            Uri url = request.getUrl();
            if (!AssetPaths.HOST.equals(url.getHost())) {
                return null;
            }
            Map<String, String> headers = new HashMap<String, String>();
            headers.put("Cache-Control", "no-store");
            String asset = AssetPaths.assetFor(url.getPath());
            if (asset != null) {
                try {
                    InputStream in = assets.open(asset, AssetManager.ACCESS_STREAMING);
                    String mime = AssetPaths.mimeType(asset);
                    return new WebResourceResponse(mime, AssetPaths.encoding(mime), 200, "OK", headers, in);
                } catch (IOException e) {
                    // not in the APK: 404 below
                }
            }
            byte[] body = ("not found: " + url.getPath()).getBytes(Charset.forName("UTF-8"));
            return new WebResourceResponse("text/plain", "utf-8", 404, "Not Found", headers,
                    new ByteArrayInputStream(body));
        }

        @Override
        @SuppressWarnings("deprecation") // the WebResourceRequest overload is API 24; this jar is API 23
        public boolean shouldOverrideUrlLoading(WebView view, String url) {
            // the demo is one page: stay on the asset origin, open nothing else inside the app
            return !AssetPaths.HOST.equals(Uri.parse(url).getHost());
        }
    }
}
